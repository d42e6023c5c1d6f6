//! Snapshots of what `orchestrate validate` says about broken pipelines: every problem at
//! once, each with file:line:col, the offending text underlined, and a hint.

mod common;
use common::Sandbox;

fn validate(case: &str, extra: &[&str]) -> (i32, String) {
    let sb = Sandbox::new();
    let text = std::fs::read_to_string(format!(
        "{}/tests/broken/{case}.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    sb.write(&format!("{case}.yaml"), &text);
    // The one file the cases read (an ingest source): the missing ones are the point.
    sb.write("corpus.txt", "a line of text\n");
    let file = format!("{case}.yaml");
    let mut args = vec!["validate", file.as_str()];
    args.extend_from_slice(extra);
    let r = sb.run(&args);
    // Hints name the absolute paths looked at; the sandbox's differs every run.
    let dir = sb.path().canonicalize().unwrap();
    let out = (r.stderr + &r.stdout).replace(dir.to_str().unwrap(), "$SANDBOX");
    (r.code, out)
}

macro_rules! broken {
    ($name:ident, $case:literal $(, $arg:literal)*) => {
        #[test]
        fn $name() {
            let (code, out) = validate($case, &[$($arg),*]);
            assert_eq!(code, 2, "{out}");
            insta::assert_snapshot!(out);
        }
    };
}

broken!(yaml_syntax_error, "syntax");
broken!(unknown_key, "unknown_key");
broken!(unknown_stage_kind, "unknown_kind");
broken!(dangling_reference, "dangling");
broken!(cycle, "cycle");
broken!(duplicate_stage_name, "duplicate_stage");
broken!(wrong_value_type, "wrong_type");
broken!(missing_required_param, "missing_param");
broken!(every_problem_at_once, "many_at_once");
broken!(
    expressions_are_placed_on_their_own_line,
    "interpolation_lines"
);
broken!(yaml_tags_are_honoured_or_refused, "tags");
#[cfg(feature = "model")]
broken!(
    edges_are_checked_beside_bad_params,
    "edges_beside_bad_params"
);
broken!(devices_outside_train_and_a_huge_timeout, "resources");
// A value left empty is shown at its key, not on the line below or past the file's end.
broken!(an_empty_value_is_shown_at_its_key, "empty_value");
// An evaluate stage given no model, an ingest source with an empty path (the pipeline's own
// folder), and timeouts that round to nothing or overflow.
#[cfg(feature = "model")]
broken!(empty_inputs_and_timeouts_out_of_reach, "empty_inputs");
#[cfg(feature = "corpus")]
broken!(a_split_that_a_later_stage_needs_is_empty, "empty_split");
#[cfg(feature = "corpus")]
broken!(files_a_stage_reads_are_missing, "missing_files");
#[cfg(feature = "model")]
broken!(a_deployed_model_its_report_did_not_score, "unscored_model");
#[cfg(feature = "model")]
broken!(params_that_other_stages_contradict, "cross_stage");
#[cfg(feature = "model")]
broken!(every_out_of_range_setting_at_once, "several_semantic");
// Quantizing a quantized model, `dynamic` blocks that do not divide the model's rows, and a
// gate comparing one model with itself: each refused before the training they would follow.
#[cfg(feature = "model")]
broken!(quantize_settings_the_model_contradicts, "quantize_chain");
broken!(names_that_differ_only_in_case_or_dashes, "folded_names");
// The caret stands under what it marks after characters two columns wide.
broken!(a_caret_after_wide_characters, "wide");
broken!(every_problem_in_one_with_block, "several_in_one_block");
// A block's own checks (ranges, keys that must agree) run beside its wrong types and keys.
#[cfg(feature = "model")]
broken!(wrong_keys_and_ranges_at_once, "bad_beside_out_of_range");
broken!(
    bad_set_path,
    "ok",
    "--set",
    "nosuch.with.run=ls",
    "--set",
    "a.with.rnu=ls",
    "--set",
    "a.kind.x=1"
);
broken!(
    set_wrong_type,
    "ok",
    "--set",
    "a.retries=lots",
    "--set",
    "a.with.outputs=[1, {x: 2}]",
    "--set",
    "a.with.env={X: a, X: b}"
);
broken!(
    set_a_list_where_text_is_expected,
    "ok",
    "--set",
    "a.with.run=[ -f out.txt ]"
);

#[test]
fn valid_pipeline_has_a_one_line_summary() {
    let (code, out) = validate("ok", &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "ok.yaml: pipeline `fine` is valid: 1 stage, 0 edges\n");
}

#[test]
fn missing_file_is_exit_2_with_the_path() {
    let sb = Sandbox::new();
    let r = sb.run(&["validate", "nope.yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("cannot read pipeline file nope.yaml"),
        "{}",
        r.stderr
    );
}

#[test]
fn help_documents_exit_codes() {
    let sb = Sandbox::new();
    let r = sb.run(&["--help"]);
    for code in ["0 ", "1 ", "2 ", "3 ", "4 ", "130 "] {
        assert!(
            r.stdout.contains(&format!("\n  {code}")),
            "exit code {code} missing from --help:\n{}",
            r.stdout
        );
    }
}

#[cfg(feature = "model")]
#[test]
fn every_example_pipeline_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = std::process::Command::new(common::BIN)
                .args(["validate", path.to_str().unwrap()])
                .env("MLFLOW_TRACKING_URI", "")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n > 0, "no pipelines found in {}", dir.display());
}

/// An empty `storage` is a mistake in the file (exit 2, at its line), not a store error
/// later; `timeout: 1.5` is seconds, as `1.5s` is; `gc --grace 0s` is zero, as `0` is.
#[test]
fn empty_storage_fractional_timeouts_and_zero_grace() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        "name: p\nstorage: ''\nstages:\n  a:\n    kind: shell\n    timeout: 1.5\n    with: { run: 'true' }\n",
    );
    let r = sb.run(&["validate", "p.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("`storage` is empty") && r.stderr.contains("p.yaml:2:10"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("timeout"), "{}", r.stderr);
    // (A store that is there: only `run` makes one.)
    std::fs::create_dir_all(sb.path().join("store")).unwrap();
    let r = sb.run(&[
        "gc",
        "--store",
        "file://store",
        "--grace",
        "0s",
        "--dry-run",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// An MLflow URL that is not one, and a spool folder that is not there, are usage errors
/// (`sync` reported "delivered 0 records" on a mistyped `--spool`).
#[test]
fn tracking_urls_and_spools_are_checked() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        "name: p\ntracking: { mlflow: notaurl }\nstages:\n  a: { kind: shell, with: { run: 'true' } }\n",
    );
    let r = sb.run(&["validate", "p.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("`notaurl` is not an MLflow server's URL")
            && r.stderr.contains("p.yaml:2:21"),
        "{}",
        r.stderr
    );
    for (args, says) in [
        (
            &["sync", "--mlflow", "ftp://x"][..],
            "not an MLflow server's URL",
        ),
        (
            &[
                "sync",
                "--mlflow",
                "http://127.0.0.1:9",
                "--spool",
                "nospool",
            ],
            "no spool folder",
        ),
    ] {
        let r = sb.run(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
}

/// Output into a pipe its reader closed (`graph | head -1`) ends the command with 141, as
/// SIGPIPE ends other tools, not in a panic (101 and a backtrace).
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let sb = Sandbox::new();
    let mut text = String::from("name: wide\nstages:\n");
    // More output than a pipe holds (64 KiB), so the write fails rather than waits.
    for i in 0..3000 {
        text.push_str(&format!(
            "  stage{i}:\n    kind: shell\n    with: {{ run: 'true' }}\n"
        ));
    }
    sb.write("p.yaml", &text);
    let mut child = sb.spawn(&["graph", "p.yaml", "--format", "dot"]);
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Commands that only look at a pipeline work where its files are not: `graph` and `export
/// argo` on a laptop without the corpus the cluster's image holds.
#[test]
fn only_commands_that_run_a_pipeline_need_its_files() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        "name: p\nstages:\n  a:\n    kind: shell\n    deps: [missing.cfg]\n    with: { run: 'true' }\n",
    );
    for args in [&["validate", "p.yaml"][..], &["plan", "p.yaml"]] {
        let r = sb.run(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("p.yaml:5:12"), "{}", r.stderr);
        assert!(r.stderr.contains("`missing.cfg` in `deps`"), "{}", r.stderr);
    }
    let r = sb.run(&["graph", "p.yaml", "--format", "mermaid"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = sb.run(&["export", "argo", "p.yaml", "--store", "s3://b/p"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// `export -o` into a folder that is not there is a usage error, and a good export written
/// over an earlier one replaces it whole, leaving no temporary file beside it.
#[test]
fn export_to_a_file_is_whole_or_a_usage_error() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        "name: p\nstages:\n  a:\n    kind: shell\n    with: { run: 'true' }\n",
    );
    let r = sb.run(&[
        "export",
        "argo",
        "p.yaml",
        "--store",
        "s3://b/p",
        "-o",
        "no/such/wf.yaml",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot write no/such/wf.yaml"),
        "{}",
        r.stderr
    );
    sb.write("wf.yaml", "old");
    let r = sb.run(&[
        "export", "argo", "p.yaml", "--store", "s3://b/p", "-o", "wf.yaml",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let text = std::fs::read_to_string(sb.path().join("wf.yaml")).unwrap();
    assert!(text.contains("kind: Workflow"), "{text}");
    let names: Vec<_> = std::fs::read_dir(sb.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !names.iter().any(|n| n.to_string_lossy().ends_with(".tmp")),
        "{names:?}"
    );
}

#[cfg(feature = "corpus")]
broken!(edge_type_mismatch, "type_mismatch");
broken!(register_unknown_stage, "register");

/// Input the validator cannot take whole is still placed and named: bytes that are not
/// UTF-8 by line and column, `params` that is no mapping, an empty name, and a mapping of
/// many keys (each duplicate found by an index, not a search) in reasonable time.
#[test]
fn odd_files_are_placed_and_named() {
    let sb = Sandbox::new();
    let mut bytes = b"name: p\nstages:\n  a: { kind: shell, with: { run: \"caf".to_vec();
    bytes.extend_from_slice(b"\xe9\" } }\n");
    std::fs::write(sb.path().join("latin1.yaml"), bytes).unwrap();
    let r = sb.run(&["validate", "latin1.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("latin1.yaml:3:38: the pipeline file is not UTF-8"),
        "{}",
        r.stderr
    );
    sb.write(
        "p.yaml",
        "name: ' '\nparams: [1, 2]\nstages:\n  a: { kind: shell, with: { run: 'true' } }\n",
    );
    let r = sb.run(&["validate", "p.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("`name` is empty"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("`params` must be a mapping of names to values, found a list"),
        "{}",
        r.stderr
    );
    let mut text = String::from("name: p\nparams:\n");
    for i in 0..50_000 {
        text.push_str(&format!("  k{i}: {i}\n"));
    }
    text.push_str("  k7: again\nstages:\n  a: { kind: shell, with: { run: 'true' } }\n");
    sb.write("many.yaml", &text);
    let r = sb.run(&["validate", "many.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("duplicate key `k7`"), "{}", r.stderr);
    assert!(
        r.stderr.contains("first defined at line 10"),
        "{}",
        r.stderr
    );
}
