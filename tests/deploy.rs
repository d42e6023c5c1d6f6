//! Shipping: the container and monitoring files checked as far as this machine allows (no
//! container engine here), the Argo export against Argo's published schema, and
//! reproducible retraining: two clean runs of pipelines/ci.yaml give identical artifacts.
#![cfg(feature = "model")]

mod common;
#[path = "common/servers.rs"]
mod servers;
use common::Sandbox;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// tests/deploy_files/check.py run with the test virtualenv's Python (jsonschema, pyyaml).
fn check(args: &[&str]) -> Option<(i32, String)> {
    let venv = servers::venv()?;
    let out = Command::new(venv.join("bin/python"))
        .arg(root().join("tests/deploy_files/check.py"))
        .args(args)
        .output()
        .unwrap();
    Some((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[test]
fn compose_file_follows_the_compose_specification() {
    let Some((code, out)) = check(&["compose"]) else {
        return;
    };
    assert_eq!(code, 0, "{out}");
}

fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("promtool"))
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install promtool (Debian package `prometheus`)"
        );
        eprintln!("skipped: no promtool");
    }
    found
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    let Some(promtool) = promtool() else { return };
    let dir = root().join("deploy/prometheus");
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn argo_export_validates_against_argos_schema() {
    let sb = Sandbox::new();
    let full = root().join("pipelines/full.yaml");
    let r = sb.run(&[
        "export",
        "argo",
        full.to_str().unwrap(),
        "--store",
        "s3://team/cache",
        "-o",
        "wf.yaml",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let wf = sb.read("wf.yaml");
    // One template per stage plus the DAG; dependencies follow the pipeline's edges.
    for stage in [
        "corpus",
        "tokenizer",
        "model",
        "int8",
        "fp16",
        "dynamic",
        "evaluation",
        "deploy",
    ] {
        assert!(wf.contains(&format!("name: {stage}\n")), "{stage}:\n{wf}");
    }
    assert!(wf.contains("s3://team/cache"));
    assert_eq!(wf.matches("- \"--only\"").count(), 8, "{wf}");
    if let Some((code, out)) = check(&["argo", sb.path().join("wf.yaml").to_str().unwrap()]) {
        assert_eq!(code, 0, "{out}\n{wf}");
    }
    // A GPU stage asks for one.
    let r = sb.run(&[
        "export",
        "argo",
        full.to_str().unwrap(),
        "--store",
        "s3://team/cache",
        "--set",
        "model.resources.device=cuda",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("nvidia.com/gpu: \"1\""), "{}", r.stdout);
    // ... and every task runs with the override, not the file as written.
    assert_eq!(
        r.stdout.matches("- model.resources.device=cuda\n").count(),
        8,
        "{}",
        r.stdout
    );
    // A local store cannot be shared by pods.
    let r = sb.run(&[
        "export",
        "argo",
        full.to_str().unwrap(),
        "--store",
        "file://x",
    ]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("s3://"), "{}", r.stderr);

    // Stage names that fold to one task name (`a`, `a_`) or to the DAG's own, a pipeline
    // name with no Kubernetes letters, a variable the pipeline reads, orchestrate's own
    // retries, and data-parallel GPUs: a workflow Argo takes, that runs what `plan` shows.
    sb.write(
        "odd.yaml",
        r#"
name: модель
storage: s3://b/p
# Not read: ${env.COMMENTED}
stages:
  a: { kind: shell, with: { run: "echo ${env.GREETING:-hi}" } }
  a_: { kind: shell, inputs: [a], with: { run: "true" } }
  pipeline: { kind: shell, retries: 2, with: { run: "true" } }
  storage: { kind: shell, resources: { device: "cuda:1" }, with: { run: "echo ${env.HF_TOKEN:-none}" } }
"#,
    );
    let r = sb
        .cmd(&["export", "argo", "odd.yaml", "-o", "odd-wf.yaml"])
        .env("GREETING", "hello")
        .env("COMMENTED", "sekrit")
        .env("HF_TOKEN", "hf-sekrit")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let wf = sb.read("odd-wf.yaml");
    let doc = &yaml_rust2::YamlLoader::load_from_str(&wf).unwrap()[0];
    let templates: Vec<&str> = doc["spec"]["templates"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    let mut unique = templates.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5, "templates repeat: {templates:?}\n{wf}");
    for label in doc["spec"]["templates"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|t| t["metadata"]["labels"]["orchestrate.stage"].as_str())
    {
        assert!(!label.ends_with('_'), "{label}");
    }
    assert!(wf.contains("generateName: pipeline-"), "{wf}");
    assert!(
        wf.contains("name: GREETING") && wf.contains("value: hello"),
        "{wf}"
    );
    assert!(wf.contains("- stages.pipeline.retries=0"), "{wf}");
    assert!(
        !wf.contains("sekrit"),
        "a comment's variable, or a credential, travelled:\n{wf}"
    );
    // A credential the pipeline reads comes from the secret, as MLflow's password does.
    for key in [
        "HF_TOKEN",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_USERNAME",
    ] {
        assert!(wf.contains(&format!("key: {key}\n")), "{key}:\n{wf}");
    }
    // A stage named like a top-level key gets its `cuda:N` rewritten in the stage.
    assert!(
        wf.contains("- stages.storage.resources.device=cuda\n"),
        "{wf}"
    );
    assert!(wf.contains("!= 2"), "{wf}");
    if let Some((code, out)) = check(&["argo", sb.path().join("odd-wf.yaml").to_str().unwrap()]) {
        assert_eq!(code, 0, "{out}\n{wf}");
    }
}

#[test]
fn two_clean_runs_of_the_ci_pipeline_give_identical_artifacts() {
    let sb = Sandbox::new();
    let ci = root().join("pipelines/ci.yaml");
    let store = format!("file://{}", sb.path().join("store").display());
    let run = |args: &[&str]| -> common::Ran {
        sb.cmd(args)
            .env("ORCHESTRATE_CACHE_DIR", sb.path().join("cache"))
            .env("MLFLOW_TRACKING_URI", "")
            .output()
            .unwrap()
            .into()
    };
    let r = run(&["run", ci.to_str().unwrap(), "--store", &store, "--no-serve"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    // `verify` is the second clean run: every stage again, into a scratch store.
    let r = run(&["verify", ci.to_str().unwrap(), "--store", &store]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    for stage in [
        "corpus",
        "tokenizer",
        "model",
        "int8",
        "evaluation",
        "deploy",
    ] {
        let line = r
            .stdout
            .lines()
            .find(|l| l.starts_with(stage))
            .unwrap_or_default();
        assert!(line.contains("identical"), "{stage}: {}", r.stdout);
    }
}

#[test]
fn verify_names_a_stage_that_is_not_deterministic() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        r#"
name: nd
storage: file://store
stages:
  steady:
    kind: shell
    with: { run: "echo same > a.txt", outputs: [a.txt] }
  clock:
    kind: shell
    with: { run: "date +%s%N > t.txt", outputs: [t.txt] }
"#,
    );
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = sb.run(&["verify", "p.yaml"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("steady") && l.contains("identical")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("clock") && l.contains("DIFFERS")),
        "{}",
        r.stdout
    );
    assert!(
        r.stderr.contains("not deterministic: `clock`"),
        "{}",
        r.stderr
    );
}
