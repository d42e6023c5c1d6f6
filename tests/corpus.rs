//! End to end on the real corpus (Debian's fortunes and fortunes-ru, installed by .ci/test):
//! the pipelines in pipelines/ run, produce sane statistics, and a second run does no work.
#![cfg(feature = "corpus")]

mod common;
use common::{stage_status, Sandbox};

fn manifest_of(sb: &Sandbox, run: &serde_json::Value, stage: &str) -> serde_json::Value {
    let s = run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage)
        .unwrap();
    let key = s["key"].as_str().unwrap();
    serde_json::from_str(&sb.read(&format!("store/manifests/{key}.json"))).unwrap()
}

fn run_pipeline(sb: &Sandbox, name: &str, extra: &[&str]) -> common::Ran {
    let file = format!("{}/pipelines/{name}", env!("CARGO_MANIFEST_DIR"));
    let store = format!("file://{}/store", sb.path().display());
    let cache = sb.path().join("cache");
    let mut args = vec!["run", &file, "--store", &store, "--no-serve"];
    args.extend_from_slice(extra);
    sb.cmd(&args)
        .env("ORCHESTRATE_CACHE_DIR", &cache)
        .env("MLFLOW_TRACKING_URI", "")
        .output()
        .unwrap()
        .into()
}

#[test]
fn full_pipeline_on_the_real_corpus() {
    assert!(
        std::path::Path::new("/usr/share/games/fortunes/ru").is_dir(),
        "the real corpus is missing: apt-get install fortunes fortunes-ru (bash .ci/test does)"
    );
    let sb = Sandbox::new();
    // The corpus and tokenizer of the main job; training `mini` for real is for `bash .ci/main`
    // (tests/train.rs and smoke.yaml cover the train stage at test size).
    let r = run_pipeline(
        &sb,
        "full.yaml",
        &["--only", "corpus", "--only", "tokenizer"],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let runs = sb.runs();
    let run = runs.last().unwrap();

    let corpus = manifest_of(&sb, run, "corpus");
    let m = &corpus["metadata"];
    let records = m["records"].as_u64().unwrap();
    assert!(records > 30_000, "{m}");
    assert!(m["per_language"]["ru"].as_u64().unwrap() > 15_000, "{m}");
    assert!(m["per_language"]["en"].as_u64().unwrap() > 10_000, "{m}");
    assert!(
        m["dropped"]["duplicate"].as_u64().unwrap() > 0,
        "the fortune files repeat some quotes"
    );
    assert!(m["with_author"].as_u64().unwrap() > records / 3, "{m}");
    assert_eq!(
        m["per_split"]["train"].as_u64().unwrap()
            + m["per_split"]["val"].as_u64().unwrap()
            + m["per_split"]["test"].as_u64().unwrap(),
        records
    );
    assert_eq!(corpus["kind"], "Corpus");

    let tok = manifest_of(&sb, run, "tokenizer");
    let t = &tok["metadata"];
    assert_eq!(t["vocab_size"], 8000);
    assert_eq!(t["authors"], 64);
    assert_eq!(t["unk_rate"], 0.0);
    for lang in ["ru", "en"] {
        let tpw = t["validation"][lang]["tokens_per_word"].as_f64().unwrap();
        assert!((1.0..4.0).contains(&tpw), "{lang}: {tpw} tokens per word");
    }

    let again = run_pipeline(
        &sb,
        "full.yaml",
        &["--only", "corpus", "--only", "tokenizer"],
    );
    assert_eq!(again.code, 0);
    let last = sb.last_run();
    assert_eq!(stage_status(&last, "corpus"), "cached");
    assert_eq!(stage_status(&last, "tokenizer"), "cached");
}

#[test]
fn smoke_pipeline_runs() {
    let sb = Sandbox::new();
    let r = run_pipeline(&sb, "smoke.yaml", &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let run = sb.last_run();
    let corpus = manifest_of(&sb, &run, "corpus");
    assert!(corpus["metadata"]["records"].as_u64().unwrap() > 1000);
    assert_eq!(
        manifest_of(&sb, &run, "tokenizer")["metadata"]["vocab_size"],
        1000
    );
}
