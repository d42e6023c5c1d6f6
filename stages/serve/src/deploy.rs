//! The `deploy` stage: packs the chosen model with its serving configuration into a
//! Deployment artifact, after starting a real server on a loopback port and checking it
//! answers every API family. `orchestrate run` then serves the deployment (until Ctrl-C)
//! unless told `--no-serve`; `orchestrate serve` serves it any time later.

use std::path::{Path, PathBuf};
use std::time::Instant;

use orchestrate_stage::{
    canonical_params, ArtifactKind, InputDecl, Inputs, ParamError, ParamProblem, PathSegment,
    StageContext, StageDescriptor, StageError, StageOutput,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ServeOptions;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployParams {
    /// Name clients see; the model input's stage name when absent.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    #[serde(default = "default_queue")]
    pub queue: usize,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// Environment variable holding the API key (never the key itself: artifacts are shared).
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub cors_origins: Option<Vec<String>>,
    #[serde(default = "default_prompt")]
    pub smoke_prompt: String,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    8080
}
fn default_max_batch() -> usize {
    32
}
fn default_queue() -> usize {
    256
}
fn default_prompt() -> String {
    "The best way to predict the future".into()
}

pub const DESCRIPTOR: StageDescriptor = StageDescriptor {
    kind: "deploy",
    about: "packs a model for serving after smoke-testing a live server on it",
    inputs: Inputs::Typed(&[
        InputDecl {
            name: "model",
            kind: ArtifactKind::Model,
            many: false,
            required: true,
            reads: &[],
        },
        InputDecl {
            name: "report",
            kind: ArtifactKind::EvalReport,
            many: false,
            required: false,
            reads: &[],
        },
    ]),
    output: ArtifactKind::Deployment,
    // The smoke test runs on the CPU wherever the stage runs (below): its sample, which the
    // artifact records, is then the same on every machine.
    device_dependent: false,
    names_in_output: true,
    code_hash: env!("STAGE_CODE_HASH"),
    tracked_files: &["deployment.json"],
    canonical_params: canonical,
    file_deps: orchestrate_stage::no_file_deps,
    empty_part: orchestrate_stage::no_empty_parts,
    unkeyed: &[],
};

fn canonical(v: Value) -> Result<Value, ParamError> {
    let v = canonical_params::<DeployParams>(v)?;
    let p: DeployParams = serde_json::from_value(v.clone()).map_err(|e| ParamError {
        path: Vec::new(),
        problem: ParamProblem::Invalid(e.to_string()),
    })?;
    let invalid = |path: Vec<PathSegment>, msg: String| ParamError {
        path,
        problem: ParamProblem::Invalid(msg),
    };
    let at = |key: &str| vec![PathSegment::Key(key.into())];
    // Every problem at once, each at its key.
    let mut problems = Vec::new();
    // A server that may generate nothing could never pass its own smoke test: say so here,
    // before training, not after.
    if p.max_new_tokens == Some(0) {
        problems.push(invalid(
            at("max_new_tokens"),
            "at least 1 is needed (leave it out for the model's own limit)".into(),
        ));
    }
    // 0 would be a server that decodes nothing (max_batch) or takes no request (queue).
    for (key, value, most) in [
        ("max_batch", p.max_batch, crate::MAX_BATCH),
        ("queue", p.queue, crate::MAX_QUEUE),
    ] {
        if value == 0 {
            problems.push(invalid(at(key), "at least 1 is needed".into()));
        } else if value > most {
            problems.push(invalid(at(key), format!("at most {most}, got {value}")));
        }
    }
    for (i, origin) in p.cors_origins.iter().flatten().enumerate() {
        if let Some(problem) = crate::api::cors_origin_problem(origin) {
            let mut path = at("cors_origins");
            path.push(PathSegment::Index(i));
            problems.push(invalid(path, problem));
        }
    }
    // The variable's name, never the key itself: a key written here would be stored in
    // the artifact's params (and its cache key) in clear.
    if let Some(name) = &p.api_key_env {
        let is_name = name
            .chars()
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
            && name.chars().all(|c| c == '_' || c.is_ascii_alphanumeric());
        if !is_name {
            problems.push(invalid(
                at("api_key_env"),
                format!(
                    "`{name}` is not an environment variable's name (letters, digits and `_`): write the name of the variable that holds the key, never the key"
                ),
            ));
        }
    }
    orchestrate_stage::param_problems(problems)?;
    Ok(v)
}

pub const DEPLOYMENT: &str = "deployment.json";
pub const MODEL_DIR: &str = "model";

/// `deployment.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Deployment {
    pub name: String,
    pub model_stage: String,
    pub model_digest: String,
    pub params: DeployParams,
    pub smoke: Value,
}

impl Deployment {
    pub fn options(&self) -> ServeOptions {
        let p = &self.params;
        ServeOptions {
            host: p.host.clone(),
            port: p.port,
            name: self.name.clone(),
            digest: self.model_digest.clone(),
            max_batch: p.max_batch,
            queue: p.queue,
            max_new_tokens: p.max_new_tokens,
            api_key: p
                .api_key_env
                .as_ref()
                .and_then(|v| std::env::var(v).ok())
                .filter(|k| !k.is_empty()),
            key_from: p.api_key_env.clone(),
            cors_origins: p.cors_origins.clone(),
            ..ServeOptions::default()
        }
    }
}

/// A directory holding either a Deployment (deployment.json + model/) or a bare Model.
pub fn resolve(dir: &Path) -> Result<(PathBuf, ServeOptions), String> {
    let d = dir.join(DEPLOYMENT);
    if d.exists() {
        let bytes = std::fs::read(&d).map_err(|e| format!("cannot read {}: {e}", d.display()))?;
        let dep: Deployment =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", d.display()))?;
        return Ok((dir.join(MODEL_DIR), dep.options()));
    }
    if dir.join(orchestrate_model::artifact::CARD).exists() {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        return Ok((
            dir.to_path_buf(),
            ServeOptions {
                name,
                ..ServeOptions::default()
            },
        ));
    }
    Err(format!(
        "{} holds neither a deployment ({DEPLOYMENT}) nor a model ({})",
        dir.display(),
        orchestrate_model::artifact::CARD
    ))
}

/// What an evaluation report says of a model it scored.
#[derive(Debug, PartialEq)]
enum Gated {
    /// Its gate, which it passed, bounds at least one metric.
    Judged,
    /// Its gate bounds nothing: scored, not judged.
    Unbounded,
}

/// Whether an evaluation report (`report.json`'s text) scored the model with this digest:
/// only then did its quality gate, which it passed to exist, judge that model. The error
/// says which models it did score.
fn gated(report: &str, digest: &str) -> Result<Gated, String> {
    let v: Value = serde_json::from_str(report)
        .map_err(|e| format!("has a report.json that is not JSON: {e}"))?;
    let variants = v["variants"].as_array().cloned().unwrap_or_default();
    if let Some(scored) = variants.iter().find(|r| r["model_digest"] == digest) {
        // Scored, but judged only if its gate bounds something for it: the baseline's
        // perplexity increase is nought by definition, so `max_ppl_increase` bounds the
        // other models only.
        let baseline = scored["name"] == v["baseline"];
        let bounds = v["gate"].as_object();
        let bounds_it = |(k, b): (&String, &Value)| {
            let nought = baseline && k == "max_ppl_increase";
            !b.is_null() && !nought
        };
        let bounded = bounds.is_some_and(|g| g.iter().any(bounds_it));
        return Ok(if bounded {
            Gated::Judged
        } else {
            Gated::Unbounded
        });
    }
    let scored: Vec<String> = variants
        .iter()
        .map(|r| format!("`{}`", r["name"].as_str().unwrap_or("?")))
        .collect();
    Err(format!("scored {} and not this model", scored.join(", ")))
}

pub fn run(ctx: &StageContext<'_>) -> Result<StageOutput, StageError> {
    let p: DeployParams = ctx.params()?;
    let model = ctx.input("model")?;
    // The report's gate passed (or the report would not exist); it covers this model only
    // if it scored it. `fp16` deployed beside a report on `[model, int8]` was ungated.
    match ctx.input("report") {
        Ok(report) => {
            let text = std::fs::read_to_string(report.dir.join("report.json"))
                .map_err(|e| StageError::io("cannot read the report's report.json", e))?;
            let gated = gated(&text, &model.digest).map_err(|e| {
                StageError::Failed(format!(
                    "input `report` (stage `{}`) {e}, so its gate does not cover input `model` (stage `{}`): add `{}` to its models, or deploy one it scored",
                    report.stage, model.stage, model.stage
                ))
            })?;
            if gated == Gated::Unbounded {
                ctx.events.log(&format!(
                    "input `report` (stage `{}`) has a gate that bounds nothing: the model is scored, not judged",
                    report.stage
                ));
            }
        }
        Err(_) => ctx.events.log(
            "no input `report`: no evaluation's quality gate covers this model (bind `report` to an evaluate stage to require one)",
        ),
    }
    let name = p.name.clone().unwrap_or_else(|| model.stage.clone());
    let out_model = ctx.out_dir.join(MODEL_DIR);
    std::fs::create_dir_all(&out_model).map_err(|e| StageError::io("cannot create model/", e))?;
    for entry in
        std::fs::read_dir(&model.dir).map_err(|e| StageError::io("cannot list the model", e))?
    {
        let entry = entry.map_err(|e| StageError::io("cannot list the model", e))?;
        if entry.path().is_file() {
            std::fs::copy(entry.path(), out_model.join(entry.file_name()))
                .map_err(|e| StageError::io("cannot copy the model", e))?;
        }
    }
    let mut dep = Deployment {
        name: name.clone(),
        model_stage: model.stage.clone(),
        model_digest: model.digest.clone(),
        params: p.clone(),
        smoke: Value::Null,
    };
    let mut opts = dep.options();
    // The smoke server listens on a free loopback port, never the configured one.
    opts.host = "127.0.0.1".into();
    opts.port = 0;
    opts.api_key = None;
    opts.key_from = None;
    // On the CPU, whatever `resources.device` says: a GPU's first requests compile kernels
    // for minutes, and the greedy sample recorded in the artifact would depend on the
    // machine. The GPU path of a model is checked where it is timed, by `evaluate`;
    // `orchestrate serve --device cuda` serves from one.
    opts.device = "cpu".into();
    ctx.events.log(&format!(
        "smoke-testing `{name}` on a loopback server (CPU)"
    ));
    wait_for_left_behind(ctx.cancel, &|m| ctx.events.log(m))?;
    let dir = out_model.clone();
    let prompt = p.smoke_prompt.clone();
    let cancel = ctx.cancel.clone();
    // A runtime of its own, on a thread of its own: this stage runs on a blocking thread of
    // the orchestrator's runtime, where a nested runtime may not block.
    let smoke = std::thread::spawn(move || -> Result<Value, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(smoke_test(&dir, &opts, &prompt, &cancel))
    });
    // Ctrl-C or the stage's `timeout` ends the stage at once, even while the model loads
    // (which nothing can interrupt): the thread, left behind, stops its server as soon as
    // it sees the cancellation too.
    while !smoke.is_finished() {
        if ctx.cancel.is_cancelled() {
            left_behind().push(smoke);
            return Err(StageError::Cancelled);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let smoke = smoke
        .join()
        .map_err(|_| StageError::Failed("the smoke test thread panicked".into()))?
        .map_err(|e| StageError::Failed(format!("smoke test failed: {e}")))?;
    for (k, v) in smoke.as_object().into_iter().flatten() {
        if let Some(x) = v.as_f64() {
            ctx.events.metric(&format!("smoke.{k}"), x, None);
        }
    }
    // Timings vary run to run: they go to the manifest and metrics, not into the artifact,
    // so an unchanged model deploys to the same bytes (CI retraining compares digests).
    let mut reproducible = smoke.clone();
    if let Some(o) = reproducible.as_object_mut() {
        o.remove("generate_ms");
    }
    dep.smoke = reproducible;
    std::fs::write(
        ctx.out_dir.join(DEPLOYMENT),
        serde_json::to_vec_pretty(&dep).expect("plain JSON"),
    )
    .map_err(|e| StageError::io("cannot write deployment.json", e))?;
    let mut output = StageOutput::default();
    output.metadata.insert("name".into(), name.into());
    output
        .metadata
        .insert("model_stage".into(), model.stage.clone().into());
    output.metadata.insert("smoke".into(), smoke);
    output
        .metadata
        .insert("url".into(), format!("http://{}:{}", p.host, p.port).into());
    Ok(output)
}

type SmokeThread = std::thread::JoinHandle<Result<Value, String>>;

/// Smoke tests whose stage was cancelled while their model loaded: each ends once loaded.
fn left_behind() -> std::sync::MutexGuard<'static, Vec<SmokeThread>> {
    static LEFT_BEHIND: std::sync::Mutex<Vec<SmokeThread>> = std::sync::Mutex::new(Vec::new());
    LEFT_BEHIND.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until the smoke tests left behind by cancelled deploys have ended: a retry after
/// a `timeout` would otherwise load a second copy of the model beside the first. `log`
/// says why the stage waits; a cancellation of this stage ends the wait.
fn wait_for_left_behind(
    cancel: &orchestrate_stage::CancelToken,
    log: &dyn Fn(&str),
) -> Result<(), StageError> {
    let mut told = false;
    loop {
        let mut threads = left_behind();
        threads.retain(|t| !t.is_finished());
        if threads.is_empty() {
            return Ok(());
        }
        drop(threads);
        if cancel.is_cancelled() {
            return Err(StageError::Cancelled);
        }
        if !told {
            log("waiting for a cancelled smoke test to finish loading its model and stop");
            told = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// How long one smoke-test request may take: a model that does not answer in this is not
/// one to deploy, and the stage must not wait for it for ever.
const SMOKE_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

async fn smoke_test(
    dir: &Path,
    opts: &ServeOptions,
    prompt: &str,
    cancel: &orchestrate_stage::CancelToken,
) -> Result<Value, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let dir = dir.to_path_buf();
    let opts = opts.clone();
    let server = tokio::spawn(async move {
        crate::serve(
            &dir,
            &opts,
            |addr| {
                let _ = tx.send(addr);
            },
            async {
                let _ = stop_rx.await;
            },
        )
        .await
    });
    let addr = match rx.await {
        Ok(a) => a,
        Err(_) => {
            return Err(server
                .await
                .map_err(|e| e.to_string())?
                .err()
                .map(String::from)
                .unwrap_or_default())
        }
    };
    let cancelled = async {
        while !cancel.is_cancelled() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let base = format!("http://{addr}");
    let result = tokio::select! {
        r = checks(&base, prompt) => r,
        () = cancelled => Err("cancelled".into()),
    };
    let _ = stop_tx.send(());
    server.await.map_err(|e| e.to_string())??;
    result
}

async fn checks(base: &str, prompt: &str) -> Result<Value, String> {
    let http = reqwest::Client::builder()
        .timeout(SMOKE_REQUEST_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    let get = |path: &str| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let r = http
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            let status = r.status();
            let text = r.text().await.map_err(|e| format!("GET {url}: {e}"))?;
            if !status.is_success() {
                return Err(format!("GET {url}: {status}: {text}"));
            }
            Ok(text)
        }
    };
    let post = |path: &str, body: Value| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let r = http
                .post(&url)
                .json(&body)
                .send()
                .await
                .map_err(|e| format!("POST {url}: {e}"))?;
            let status = r.status().as_u16();
            let text = r.text().await.map_err(|e| format!("POST {url}: {e}"))?;
            Ok::<_, String>((status, text))
        }
    };
    get("/health").await?;
    let info: Value =
        serde_json::from_str(&get("/info").await?).map_err(|e| format!("/info: {e}"))?;
    // Within the server's `max_new_tokens` (a deployment may set fewer than asked below).
    let limit = info["max_total_tokens"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(info["max_input_tokens"].as_u64().unwrap_or(0));
    let tokens_at_most = |n: u64| n.min(limit).max(1);
    let t = Instant::now();
    let (status, text) = post(
        "/generate",
        json!({"inputs": prompt, "parameters": {"max_new_tokens": tokens_at_most(16), "details": true}}),
    )
    .await?;
    let generate_ms = t.elapsed().as_secs_f64() * 1e3;
    if status != 200 {
        return Err(format!("/generate answered {status}: {text}"));
    }
    let gen: Value = serde_json::from_str(&text).map_err(|e| format!("/generate: {e}"))?;
    let tokens = gen["details"]["generated_tokens"].as_u64().unwrap_or(0);
    if tokens == 0 {
        return Err(format!("/generate generated nothing: {text}"));
    }
    let (status, text) = post(
        "/generate_stream",
        json!({"inputs": prompt, "parameters": {"max_new_tokens": tokens_at_most(8)}}),
    )
    .await?;
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .collect();
    let last: Value = events
        .last()
        .and_then(|l| serde_json::from_str(l.trim()).ok())
        .unwrap_or(Value::Null);
    if status != 200 || last["generated_text"].is_null() {
        return Err(format!(
            "/generate_stream answered {status} without a final event: {text}"
        ));
    }
    let (status, text) = post(
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": tokens_at_most(8), "temperature": 0}),
    )
    .await?;
    if status != 200 || !text.contains("\"text_completion\"") {
        return Err(format!("/v1/completions answered {status}: {text}"));
    }
    let (status, text) = post(
        "/generate",
        json!({"inputs": prompt, "parameters": {"temperature": -1}}),
    )
    .await?;
    if status != 422 || !text.contains("parameters.temperature") {
        return Err(format!(
            "a bad temperature should be a 422 naming the field, got {status}: {text}"
        ));
    }
    let metrics = get("/metrics").await?;
    if !metrics.contains("orchestrate_generated_tokens_total") {
        return Err("/metrics lacks orchestrate_generated_tokens_total".into());
    }
    Ok(json!({
        "model_id": info["model_id"],
        "generate_ms": generate_ms,
        "generated_tokens": tokens,
        "stream_events": events.len(),
        "sample": gen["generated_text"],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_covers_only_the_models_it_scored() {
        let report = json!({"variants": [
            {"name": "model", "model_digest": "blake3:aa"},
            {"name": "int8", "model_digest": "blake3:bb"},
        ]})
        .to_string();
        assert_eq!(gated(&report, "blake3:bb"), Ok(Gated::Unbounded));
        let judged = json!({
            "gate": {"max_ppl_increase": 0.05, "max_ppl": null},
            "variants": [{"name": "int8", "model_digest": "blake3:bb"}],
        })
        .to_string();
        assert_eq!(gated(&judged, "blake3:bb"), Ok(Gated::Judged));
        // The baseline's own increase is nought: `max_ppl_increase` alone does not judge it.
        let baseline_only = json!({
            "baseline": "model",
            "gate": {"max_ppl_increase": 0.05, "max_ppl": null},
            "variants": [
                {"name": "model", "model_digest": "blake3:aa"},
                {"name": "int8", "model_digest": "blake3:bb"},
            ],
        });
        assert_eq!(
            gated(&baseline_only.to_string(), "blake3:aa"),
            Ok(Gated::Unbounded)
        );
        assert_eq!(
            gated(&baseline_only.to_string(), "blake3:bb"),
            Ok(Gated::Judged)
        );
        let mut also_max_ppl = baseline_only;
        also_max_ppl["gate"]["max_ppl"] = json!(200.0);
        assert_eq!(
            gated(&also_max_ppl.to_string(), "blake3:aa"),
            Ok(Gated::Judged)
        );
        let e = gated(&report, "blake3:cc").unwrap_err();
        assert!(
            e.contains("scored `model`, `int8` and not this model"),
            "{e}"
        );
        // A report from before digests were recorded covers nothing: evaluate reruns anyway
        // (its code is in its cache key), so this is never met in a pipeline.
        assert!(gated(r#"{"variants": [{"name": "model"}]}"#, "blake3:aa").is_err());
        assert!(gated("not json", "blake3:aa")
            .unwrap_err()
            .contains("not JSON"));
    }

    #[test]
    fn a_malformed_cors_origin_is_refused_at_its_index() {
        let e =
            canonical(json!({"cors_origins": ["https://ui.example", "ui.example/"]})).unwrap_err();
        assert_eq!(
            e.path,
            vec![
                PathSegment::Key("cors_origins".into()),
                PathSegment::Index(1)
            ]
        );
        assert!(
            e.to_string().contains("`ui.example/` is not an origin"),
            "{e}"
        );
        assert!(canonical(json!({"cors_origins": ["*", "http://127.0.0.1:3000"]})).is_ok());
    }

    #[test]
    fn a_server_that_may_generate_nothing_is_refused() {
        for key in ["max_new_tokens", "max_batch", "queue"] {
            let e = canonical(json!({key: 0})).unwrap_err();
            assert_eq!(e.path, vec![PathSegment::Key(key.into())]);
            assert!(canonical(json!({key: 1})).is_ok());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deployment_allowing_fewer_than_16_new_tokens_passes_its_smoke_test() {
        let opts = ServeOptions {
            max_new_tokens: Some(3),
            ..crate::testkit::options()
        };
        let smoke = smoke_test(
            crate::testkit::model_dir(),
            &opts,
            "it is",
            &orchestrate_stage::CancelToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(smoke["generated_tokens"], 3, "{smoke}");
    }

    /// A deploy waits for the smoke tests cancelled deploys left loading, and its own
    /// cancellation ends the wait.
    #[test]
    fn a_deploy_waits_for_a_smoke_test_left_loading() {
        let (release, released) = std::sync::mpsc::channel::<()>();
        left_behind().push(std::thread::spawn(move || {
            let _ = released.recv();
            Ok(Value::Null)
        }));
        let cancel = orchestrate_stage::CancelToken::new();
        let log = std::sync::Mutex::new(Vec::new());
        let waiter = std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                wait_for_left_behind(&cancel, &|m| log.lock().unwrap().push(m.to_string()))
            });
            std::thread::sleep(std::time::Duration::from_millis(300));
            // Still waiting: the thread has not ended.
            assert!(!waiter.is_finished());
            release.send(()).unwrap();
            waiter.join().unwrap()
        });
        assert!(waiter.is_ok());
        assert!(log.lock().unwrap()[0].contains("cancelled smoke test"));
        // Cancelled while another is left loading: the stage ends, the thread stays listed.
        let (_keep, held) = std::sync::mpsc::channel::<()>();
        left_behind().push(std::thread::spawn(move || {
            let _ = held.recv_timeout(std::time::Duration::from_secs(5));
            Ok(Value::Null)
        }));
        cancel.cancel();
        assert!(matches!(
            wait_for_left_behind(&cancel, &|_| {}),
            Err(StageError::Cancelled)
        ));
        assert!(!left_behind().is_empty());
    }

    /// Ctrl-C (or the stage's timeout) stops the smoke test's checks and its server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_smoke_test_stops_its_server() {
        let cancel = orchestrate_stage::CancelToken::new();
        cancel.cancel();
        let opts = crate::testkit::options();
        let r = smoke_test(crate::testkit::model_dir(), &opts, "it is", &cancel).await;
        assert_eq!(r, Err("cancelled".to_string()));
    }
}
