//! Tracking against a real MLflow server (started here from the `.ci/venv` virtualenv):
//! parent and child runs, params, metric histories, artifacts; and a server that goes away
//! mid-run, whose records wait in the spool until `orchestrate sync` delivers each once.

mod common;
#[path = "common/servers.rs"]
mod servers;

use common::Sandbox;
use serde_json::json;
#[cfg(feature = "corpus")]
use servers::s3;
use servers::{mlflow_api, Server};

fn search(base: &str, exp: &str, filter: &str) -> Vec<serde_json::Value> {
    let v = mlflow_api(
        base,
        "runs/search",
        Some(json!({"experiment_ids": [exp], "filter": filter, "max_results": 100})),
    );
    v["runs"].as_array().cloned().unwrap_or_default()
}

/// The id of experiment `name`, which the run under test created.
fn experiment_id(base: &str, name: &str) -> String {
    let v = mlflow_api(
        base,
        &format!("experiments/get-by-name?experiment_name={name}"),
        None,
    );
    v["experiment"]["experiment_id"]
        .as_str()
        .expect("the experiment exists")
        .to_string()
}

#[cfg(feature = "corpus")]
fn tag<'a>(run: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    run["data"]["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)?["value"]
        .as_str()
}

fn param<'a>(run: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    run["data"]["params"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)?["value"]
        .as_str()
}

#[cfg(feature = "corpus")]
#[test]
fn smoke_pipeline_on_s3_is_browsable_in_mlflow() {
    let Some(venv) = servers::venv() else { return };
    let sb = Sandbox::new();
    let mlflow = Server::mlflow(&venv, sb.path());
    let moto = Server::moto(&venv);
    s3(&venv, &moto.url, "create_bucket(Bucket='shared')");
    let file = format!("{}/pipelines/smoke.yaml", env!("CARGO_MANIFEST_DIR"));
    let run = |extra_env: &[(&str, &str)]| {
        let mut c = sb.cmd(&["run", &file, "--store", "s3://shared/team", "--no-serve"]);
        c.env("MLFLOW_TRACKING_URI", &mlflow.url)
            .env("ORCHESTRATE_CACHE_DIR", sb.path().join("cache"))
            .env("AWS_ENDPOINT_URL", &moto.url)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .envs(extra_env.iter().copied());
        c.output().unwrap()
    };
    let out = run(&[("ORCHESTRATE_SYSTEM_METRICS_SECS", "0.2")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("tracking:"),
        "delivery reported a problem: {stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let run_id = stdout.split_whitespace().nth(1).unwrap().to_string();
    // Every record delivered as the run ended: its spool, and the copy of the registered
    // model in it, are gone.
    let spool = sb.path().join("cache/spool");
    assert!(!spool.join(format!("{run_id}.jsonl")).exists());
    assert!(!spool.join("files").join(&run_id).exists());
    // The artifacts are in the bucket: one manifest per stage.
    let listed = s3(
        &venv,
        &moto.url,
        "list_objects_v2(Bucket='shared', Prefix='team/manifests/')['KeyCount']",
    );
    assert_eq!(listed.trim(), "6", "{stdout}");

    let exp = experiment_id(&mlflow.url, "smoke");
    let parents = search(
        &mlflow.url,
        &exp,
        &format!("tags.`orchestrate.run_id` = '{run_id}'"),
    );
    assert_eq!(parents.len(), 1);
    let parent = &parents[0];
    assert_eq!(parent["info"]["status"], "FINISHED");
    assert_eq!(param(parent, "tokenizer.vocab_size"), Some("1000"));
    assert_eq!(param(parent, "model.steps"), Some("30"));
    assert_eq!(param(parent, "corpus.split.val"), Some("0.05"));
    assert!(tag(parent, "mlflow.source.git.commit").is_some());
    let parent_id = parent["info"]["run_id"].as_str().unwrap();

    let children = search(
        &mlflow.url,
        &exp,
        &format!("tags.mlflow.parentRunId = '{parent_id}'"),
    );
    assert_eq!(children.len(), 6, "{children:?}");
    let tok = children
        .iter()
        .find(|c| c["info"]["run_name"] == "tokenizer")
        .unwrap();
    assert_eq!(tag(tok, "orchestrate.status"), Some("ran"));
    assert!(tag(tok, "orchestrate.cache_key").is_some());
    assert!(tag(tok, "orchestrate.input.corpus")
        .unwrap()
        .starts_with("blake3:"));
    assert_eq!(param(tok, "vocab_size"), Some("1000"));
    let tok_id = tok["info"]["run_id"].as_str().unwrap();
    let metrics = tok["data"]["metrics"].as_array().unwrap();
    assert!(
        metrics.iter().any(|m| m["key"] == "tokens_per_word_ru"),
        "{metrics:?}"
    );

    // A metric history with steps: system metrics sampled every 0.2 s.
    let hist = mlflow_api(
        &mlflow.url,
        &format!("metrics/get-history?run_id={parent_id}&metric_key=system/system_memory_usage_megabytes"),
        None,
    );
    let steps: Vec<i64> = hist["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["step"].as_i64().unwrap())
        .collect();
    assert!(
        steps.len() >= 2 && steps.windows(2).all(|w| w[0] < w[1]),
        "{steps:?}"
    );

    let arts = mlflow_api(
        &mlflow.url,
        &format!("artifacts/list?run_id={tok_id}"),
        None,
    );
    let names: Vec<&str> = arts["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"tokenizer.json") && names.contains(&"tokenizer_meta.json"),
        "{names:?}"
    );
    // Streamed up from its file: whole, its size as listed, and still a tokenizer.
    let listed_size = arts["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "tokenizer.json")
        .and_then(|f| f["file_size"].as_u64())
        .expect("a listed size");
    let (code, text) = servers::http(
        "GET",
        &format!(
            "{}/get-artifact?path=tokenizer.json&run_uuid={tok_id}",
            mlflow.url
        ),
        None,
    )
    .unwrap();
    assert_eq!(code, 200, "{text}");
    assert_eq!(text.len() as u64, listed_size);
    let tokenizer: serde_json::Value = serde_json::from_str(&text).expect("whole JSON");
    assert_eq!(
        tokenizer["model"]["type"],
        "BPE",
        "{}",
        &text[..200.min(text.len())]
    );
    let arts = mlflow_api(
        &mlflow.url,
        &format!("artifacts/list?run_id={parent_id}"),
        None,
    );
    assert!(arts["files"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["path"] == "run.json"));

    // The evaluation's report, table and chart went up through the artifact proxy.
    let eval_run = children
        .iter()
        .find(|c| c["info"]["run_name"] == "evaluation")
        .unwrap();
    let arts = mlflow_api(
        &mlflow.url,
        &format!(
            "artifacts/list?run_id={}",
            eval_run["info"]["run_id"].as_str().unwrap()
        ),
        None,
    );
    let names: Vec<&str> = arts["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    for want in ["report.json", "report.md", "chart.png"] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    assert!(eval_run["data"]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["key"] == "int8.perplexity"));

    // The deployed model is a registered model version, its files under the run's `model/`.
    let model_run = children
        .iter()
        .find(|c| c["info"]["run_name"] == "deploy")
        .unwrap();
    let model_run_id = model_run["info"]["run_id"].as_str().unwrap().to_string();
    let versions = mlflow_api(
        &mlflow.url,
        "model-versions/search?filter=name%3D%27prometheus-smoke%27",
        None,
    );
    let versions = versions["model_versions"].as_array().unwrap().clone();
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(versions[0]["run_id"], model_run_id.as_str());
    assert!(versions[0]["source"].as_str().unwrap().ends_with("/model"));
    let files = mlflow_api(
        &mlflow.url,
        &format!("artifacts/list?run_id={model_run_id}&path=model"),
        None,
    );
    let names: Vec<&str> = files["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"model/deployment.json") && names.contains(&"model/model"),
        "{names:?}"
    );
    assert!(names.contains(&"model/MODEL_CARD.md"), "{names:?}");

    // A second run reuses every artifact and says which run produced it.
    let out = run(&[]);
    assert!(out.status.success());
    let second = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let p2 = &search(
        &mlflow.url,
        &exp,
        &format!("tags.`orchestrate.run_id` = '{second}'"),
    )[0];
    let p2_id = p2["info"]["run_id"].as_str().unwrap();
    let kids = search(
        &mlflow.url,
        &exp,
        &format!("tags.mlflow.parentRunId = '{p2_id}'"),
    );
    assert_eq!(kids.len(), 6);
    let versions = mlflow_api(
        &mlflow.url,
        "model-versions/search?filter=name%3D%27prometheus-smoke%27",
        None,
    );
    assert_eq!(
        versions["model_versions"].as_array().unwrap().len(),
        1,
        "a reused model is not registered again"
    );
    for k in &kids {
        assert_eq!(tag(k, "orchestrate.reused"), Some("true"));
        assert_eq!(tag(k, "orchestrate.produced_by"), Some(run_id.as_str()));
    }
}

#[test]
fn mlflow_down_mid_run_then_sync_delivers_every_record_once() {
    let Some(venv) = servers::venv() else { return };
    let sb = Sandbox::new();
    let mut mlflow = Server::mlflow(&venv, sb.path());
    sb.write(
        "p.yaml",
        &format!(
            r#"
name: outage
storage: file://store
tracking: {{ mlflow: "{}", experiment: outage }}
stages:
  first:
    kind: shell
    # Held until the server is down (at most a minute), however long it takes to stop.
    with: {{ run: "echo 1 > a; touch $PIPELINE_DIR/first-done; i=0; until [ -e $PIPELINE_DIR/server-down ] || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done", outputs: [a] }}
  second:
    kind: shell
    inputs: [first]
    with: {{ run: "cat $INPUT_FIRST/a > b", outputs: [b] }}
"#,
            mlflow.url
        ),
    );
    let child = sb.spawn(&["run", "p.yaml"]);
    assert!(sb.wait_for("first-done", 30));
    mlflow.stop();
    sb.write("server-down", "");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the run must succeed without its tracking server: {stderr}"
    );
    assert!(stderr.contains("orchestrate sync"), "{stderr}");

    let run_id = sb.last_run()["id"].as_str().unwrap().to_string();
    let spool = sb.path().join(format!(".orchestrate/spool/{run_id}.jsonl"));
    let records = std::fs::read_to_string(&spool).unwrap().lines().count() as u64;
    assert!(records >= 8, "{records} records spooled");

    // Another pipeline beside this one shares its cache: its spool, meant for another
    // server maybe, is left alone.
    let other = sb.path().join(".orchestrate/spool/other.jsonl");
    let foreign = json!({"seq": 1, "op": "start_run", "uid": "o", "parent": null,
        "experiment": "elsewhere", "name": "o", "start_ms": 1,
        "tags": {"orchestrate.pipeline": "another"}});
    std::fs::write(&other, format!("{foreign}\n")).unwrap();
    mlflow.start();
    let sync = sb.run(&["sync", "--pipeline", "p.yaml"]);
    assert_eq!(sync.code, 0, "{}", sync.stderr);
    assert!(
        sync.stdout
            .contains("passed over 1 spools of other pipelines sharing this cache"),
        "{}",
        sync.stdout
    );
    assert!(other.exists());
    assert!(
        sync.stdout
            .contains(&format!("delivered {records} records from 1 spooled runs")),
        "{}",
        sync.stdout
    );
    // Delivered to its end, the spool is done with.
    assert!(!spool.exists() && !spool.with_extension("state.json").exists());
    // Again: nothing more to deliver, nothing duplicated.
    let again = sb.run(&["sync", "--pipeline", "p.yaml"]);
    assert!(
        again.stdout.contains("delivered 0 records"),
        "{}",
        again.stdout
    );

    let exp = experiment_id(&mlflow.url, "outage");
    let parents = search(
        &mlflow.url,
        &exp,
        &format!("tags.`orchestrate.run_id` = '{run_id}'"),
    );
    assert_eq!(parents.len(), 1, "the parent run exists exactly once");
    assert_eq!(parents[0]["info"]["status"], "FINISHED");
    let parent_id = parents[0]["info"]["run_id"].as_str().unwrap();
    let kids = search(
        &mlflow.url,
        &exp,
        &format!("tags.mlflow.parentRunId = '{parent_id}'"),
    );
    assert_eq!(kids.len(), 2);
    assert!(kids.iter().all(|k| k["info"]["status"] == "FINISHED"));
    let all = search(&mlflow.url, &exp, "");
    assert_eq!(all.len(), 3, "no run was created twice");
}

/// Pipeline params are free-form YAML keys; MLflow's are not. A key it would refuse is
/// renamed, not allowed to lose the whole batch it came in (and every record after it).
#[test]
fn keys_mlflow_refuses_are_renamed_and_a_refused_record_blocks_nothing() {
    let Some(venv) = servers::venv() else { return };
    let sb = Sandbox::new();
    let mlflow = Server::mlflow(&venv, sb.path());
    sb.write(
        "p.yaml",
        &format!(
            r#"
name: oddkeys
storage: file://store
tracking: {{ mlflow: "{}", experiment: oddkeys }}
params: {{ "batch(size)": 8 }}
stages:
  only:
    kind: shell
    with: {{ run: "echo hi > a", outputs: [a] }}
"#,
            mlflow.url
        ),
    );
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("tracking:"), "{}", r.stderr);
    let exp = experiment_id(&mlflow.url, "oddkeys");
    let run_id = sb.last_run()["id"].as_str().unwrap().to_string();
    let parents = search(
        &mlflow.url,
        &exp,
        &format!("tags.`orchestrate.run_id` = '{run_id}'"),
    );
    assert_eq!(parents.len(), 1);
    assert_eq!(parents[0]["info"]["status"], "FINISHED");
    assert_eq!(param(&parents[0], "params.batch_size_"), Some("8"));
    // `verify` re-executes into a scratch store: that is not a run, and MLflow (named in
    // the pipeline itself here) must not be told of one.
    let verify = sb.run(&["verify", "p.yaml"]);
    assert_eq!(verify.code, 0, "{}", verify.stderr);
    assert_eq!(
        search(&mlflow.url, &exp, "").len(),
        2,
        "a parent and its one stage"
    );

    // A spool with a record the server refuses (a param logged again with another value),
    // then more records and a second spool: sync passes over the one record, names it, and
    // delivers the rest.
    let spool = sb.path().join("spool");
    let start = |uid: &str| {
        json!({"seq": 1, "op": "start_run", "uid": uid, "parent": null, "experiment": "oddkeys",
               "name": uid, "start_ms": 1, "tags": {}})
    };
    let log = |uid: &str, seq: u64, value: &str| json!({"seq": seq, "op": "log", "uid": uid, "params": {"x": value}});
    let end = |uid: &str, seq: u64| json!({"seq": seq, "op": "end_run", "uid": uid, "status": "FINISHED", "end_ms": 2});
    sb.write(
        "spool/a.jsonl",
        &format!(
            "{}\n{}\n{}\n{}\n",
            start("refused"),
            log("refused", 2, "1"),
            log("refused", 3, "2"),
            end("refused", 4)
        ),
    );
    sb.write(
        "spool/b.jsonl",
        &format!("{}\n{}\n", start("fine"), end("fine", 2)),
    );
    sb.write(
        "spool/c.jsonl",
        &format!("{}\n{}\n", start("third"), end("third", 2)),
    );
    let spool_dir = spool.display().to_string();
    // A wrong URL answers 404 to everything, but not as MLflow: nothing is passed over, and
    // the records wait for the right one.
    let wrong = format!("{}/not-mlflow", mlflow.url);
    let sync = sb.run(&["sync", "--mlflow", &wrong, "--spool", &spool_dir]);
    assert_eq!(sync.code, 1, "{}\n{}", sync.stdout, sync.stderr);
    assert!(
        sync.stdout.contains("delivered 0 records"),
        "{}",
        sync.stdout
    );
    // Two spools stopped in a row by the server: it answers so for all, and the third is
    // not tried.
    assert!(
        sync.stderr
            .contains("1 more spooled runs not tried: the server stopped the one above"),
        "{}",
        sync.stderr
    );
    let sync = sb.run(&["sync", "--mlflow", &mlflow.url, "--spool", &spool_dir]);
    assert_eq!(sync.code, 0, "{}", sync.stderr);
    assert!(
        sync.stdout.contains("delivered 8 records"),
        "{}",
        sync.stdout
    );
    assert!(
        sync.stderr
            .contains("a.jsonl, record 3: a batch of metrics, params and tags refused (400"),
        "{}",
        sync.stderr
    );
    for name in ["refused", "fine", "third"] {
        let runs = search(
            &mlflow.url,
            &exp,
            &format!("attributes.run_name = '{name}'"),
        );
        assert_eq!(runs.len(), 1, "{name}");
        assert_eq!(runs[0]["info"]["status"], "FINISHED", "{name}");
    }
    // A spool delivered whole is removed; one with a refused record stays, to be read,
    // through later syncs too.
    assert!(spool.join("a.jsonl").exists());
    assert!(!spool.join("b.jsonl").exists() && !spool.join("c.jsonl").exists());
    let again = sb.run(&["sync", "--mlflow", &mlflow.url, "--spool", &spool_dir]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(spool.join("a.jsonl").exists());
}

/// A run's MLflow runs are ended however its process ends. Killed outright (SIGKILL, or a
/// second Ctrl-C), it cannot end them itself: the next `sync` ends them as KILLED. While it
/// lives, `sync` leaves its spool alone, so the two never deliver a record twice.
#[test]
fn sync_leaves_a_live_run_alone_and_ends_a_killed_one() {
    let Some(venv) = servers::venv() else { return };
    let sb = Sandbox::new();
    let mlflow = Server::mlflow(&venv, sb.path());
    sb.write(
        "p.yaml",
        &format!(
            r#"
name: killed
storage: file://store
tracking: {{ mlflow: "{}", experiment: killed }}
stages:
  slow:
    kind: shell
    with: {{ run: "touch $PIPELINE_DIR/started; sleep 20; echo 1 > a", outputs: [a] }}
"#,
            mlflow.url
        ),
    );
    let mut child = sb.spawn(&["run", "p.yaml"]);
    assert!(sb.wait_for("started", 30));
    let live = sb.run(&["sync", "--pipeline", "p.yaml"]);
    assert_eq!(live.code, 0, "{}", live.stderr);
    assert!(
        live.stdout
            .contains("passed over 1 spools of runs still running"),
        "{}",
        live.stdout
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let after = sb.run(&["sync", "--pipeline", "p.yaml"]);
    assert_eq!(after.code, 0, "{}", after.stderr);
    assert!(
        after.stdout.contains("ended 2 MLflow runs as KILLED"),
        "{}",
        after.stdout
    );
    let exp = experiment_id(&mlflow.url, "killed");
    let runs = search(&mlflow.url, &exp, "");
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(
        runs.iter().all(|r| r["info"]["status"] == "KILLED"),
        "{runs:?}"
    );
    // Once ended, they stay so: another sync adds nothing.
    let again = sb.run(&["sync", "--pipeline", "p.yaml"]);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    assert!(!again.stdout.contains("KILLED"), "{}", again.stdout);
    let runs = search(&mlflow.url, &exp, "");
    assert_eq!(runs.len(), 2, "{runs:?}");
}
