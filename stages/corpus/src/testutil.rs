//! Runs a stage function in a scratch directory, as the orchestrator would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use orchestrate_stage::{
    ArtifactKind, CancelToken, EventSink, InputArtifact, StageContext, StageDescriptor, StageError,
    StageOutput,
};

#[derive(Default)]
pub struct Events {
    pub logs: Mutex<Vec<String>>,
    pub metrics: Mutex<BTreeMap<String, f64>>,
}

impl EventSink for Events {
    fn progress(&self, _: u64, _: Option<u64>, _: &str) {}
    fn log(&self, line: &str) {
        self.logs.lock().unwrap().push(line.to_string());
    }
    fn metric(&self, name: &str, value: f64, _: Option<u64>) {
        self.metrics.lock().unwrap().insert(name.to_string(), value);
    }
}

pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("corpus-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `run` with `params` (canonicalised by `desc`) writing into `dir/out`.
pub fn run_stage(
    desc: &StageDescriptor,
    run: fn(&StageContext<'_>) -> Result<StageOutput, StageError>,
    params: serde_json::Value,
    dir: &Path,
    inputs: &[(&str, ArtifactKind, &Path)],
) -> (Result<StageOutput, StageError>, Events) {
    let params = (desc.canonical_params)(params).expect("valid params");
    let out = dir.join("out");
    let scratch = dir.join("scratch");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&scratch).unwrap();
    let mut bound = BTreeMap::new();
    for (name, kind, path) in inputs {
        bound.insert(
            name.to_string(),
            vec![InputArtifact {
                stage: name.to_string(),
                kind: *kind,
                dir: path.to_path_buf(),
                digest: String::new(),
                metadata: serde_json::Value::Null,
            }],
        );
    }
    let events = Events::default();
    let cancel = CancelToken::new();
    let ctx = StageContext {
        stage: "test",
        params: &params,
        inputs: &bound,
        out_dir: &out,
        scratch_dir: &scratch,
        pipeline_dir: dir,
        device: "cpu",
        events: &events,
        cancel: &cancel,
        checkpoints: &orchestrate_stage::NoCheckpoints,
    };
    let r = run(&ctx);
    (r, events)
}

/// A small fortune corpus in two languages with the cases ingest must handle (a duplicate,
/// attributions written three ways, a record too short, one without an author, invalid
/// UTF-8): `datasets/fixtures/fortunes`, copied into `dir`.
pub fn write_fortunes(dir: &Path) {
    const FIXTURE: [(&str, &[u8]); 3] = [
        (
            "en.txt",
            include_bytes!("../../../datasets/fixtures/fortunes/en.txt"),
        ),
        (
            "ru.txt",
            include_bytes!("../../../datasets/fixtures/fortunes/ru.txt"),
        ),
        (
            "bad.txt",
            include_bytes!("../../../datasets/fixtures/fortunes/bad.txt"),
        ),
    ];
    for (name, bytes) in FIXTURE {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
