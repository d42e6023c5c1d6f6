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

/// A team shares one store from checkouts in different folders: an ingest stage reading a
/// file inside the repository must have one key in all of them, or the cache never hits.
#[test]
fn two_checkouts_in_different_folders_share_the_cache() {
    let sb = Sandbox::new();
    let store = format!("file://{}/store", sb.path().display());
    let pipeline = format!(
        "name: shared\nstorage: {store}\nstages:\n  corpus:\n    kind: ingest\n    with:\n      sources: [{{ path: ../datasets/quotes.txt, format: lines, lang: en }}]\n      split: {{ val: 0.2, test: 0.2 }}\n"
    );
    let quotes: String = (0..50)
        .map(|i| format!("Quote number {i} says something worth keeping.\n"))
        .collect();
    for checkout in ["alice/repo", "bob/work/repo"] {
        sb.write(&format!("{checkout}/pipelines/p.yaml"), &pipeline);
        sb.write(&format!("{checkout}/datasets/quotes.txt"), &quotes);
    }
    let run = |checkout: &str| -> common::Ran {
        let file = format!("{checkout}/pipelines/p.yaml");
        sb.cmd(&["run", &file, "--no-serve"])
            .env("ORCHESTRATE_CACHE_DIR", sb.path().join("cache"))
            .env("MLFLOW_TRACKING_URI", "")
            .output()
            .unwrap()
            .into()
    };
    let first = run("alice/repo");
    assert_eq!(first.code, 0, "{}\n{}", first.stdout, first.stderr);
    assert_eq!(stage_status(&sb.last_run(), "corpus"), "ran");
    let second = run("bob/work/repo");
    assert_eq!(second.code, 0, "{}\n{}", second.stdout, second.stderr);
    assert_eq!(stage_status(&sb.last_run(), "corpus"), "cached");
    // The file's contents still count: an edit in one checkout reruns there.
    sb.write(
        "bob/work/repo/datasets/quotes.txt",
        &quotes.replace("worth", "not worth"),
    );
    let third = run("bob/work/repo");
    assert_eq!(third.code, 0, "{}\n{}", third.stdout, third.stderr);
    assert_eq!(stage_status(&sb.last_run(), "corpus"), "ran");
}
