//! End-to-end behaviour of the engine with `shell` stages: caching, concurrency, crash
//! safety, corruption, locking, retries, timeouts, interruption, selection and gc.

mod common;
use std::time::{Duration, Instant};

use common::{line_count, stage_status, Sandbox};

/// A diamond: src feeds left and right, which both feed join. Every command appends a line to
/// `count-<stage>` in the pipeline directory, so tests can count how often each really ran.
const DIAMOND: &str = r#"
name: diamond
storage: file://store
params: { greeting: hello }
stages:
  src:
    kind: shell
    deps: [in.txt]
    with:
      run: echo x >> $PIPELINE_DIR/count-src; cp $PIPELINE_DIR/in.txt a.txt
      outputs: [a.txt]
  left:
    kind: shell
    inputs: [src]
    with:
      run: echo x >> $PIPELINE_DIR/count-left; sleep ${params.sleep}; wc -c < $INPUT_SRC/a.txt > l.txt
      outputs: [l.txt]
  right:
    kind: shell
    inputs: [src]
    with:
      run: echo x >> $PIPELINE_DIR/count-right; sleep ${params.sleep}; echo ${params.greeting} > r.txt
      outputs: [r.txt]
  join:
    kind: shell
    inputs: { l: left, r: right }
    with:
      run: echo x >> $PIPELINE_DIR/count-join; cat $INPUT_L/l.txt $INPUT_R/r.txt > j.txt
      outputs: [j.txt]
"#;

fn diamond(sleep: &str) -> Sandbox {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        &DIAMOND.replace(
            "params: { greeting: hello }",
            &format!("params: {{ greeting: hello, sleep: {sleep} }}"),
        ),
    );
    sb.write("in.txt", "some input\n");
    sb
}

/// Runs the diamond once per greeting; the run ids, in order.
fn run_greetings(sb: &Sandbox, greetings: &[&str]) -> Vec<String> {
    greetings
        .iter()
        .map(|greeting| {
            let set = format!("params.greeting={greeting}");
            assert_eq!(sb.run(&["run", "p.yaml", "--set", &set]).code, 0);
            sb.last_run()["id"].as_str().unwrap().to_string()
        })
        .collect()
}

fn counts(sb: &Sandbox) -> [usize; 4] {
    ["src", "left", "right", "join"].map(|s| line_count(&sb.read(&format!("count-{s}"))))
}

fn interval(
    run: &serde_json::Value,
    stage: &str,
) -> (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) {
    let s = run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage)
        .unwrap();
    (
        s["started_at"].as_str().unwrap().parse().unwrap(),
        s["ended_at"].as_str().unwrap().parse().unwrap(),
    )
}

#[test]
fn second_run_of_an_unchanged_pipeline_does_no_work() {
    let sb = diamond("0");
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(counts(&sb), [1, 1, 1, 1]);
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.contains("0 ran, 4 cached, 0 failed"),
        "{}",
        r.stdout
    );
    assert_eq!(counts(&sb), [1, 1, 1, 1]);
    let plan = sb.run(&["plan", "p.yaml"]);
    assert!(
        plan.stdout.contains("4 cached, 0 will run, 0 blocked"),
        "{}",
        plan.stdout
    );
}

/// A pipeline in a folder whose name is not UTF-8 runs (the run record keeps the command
/// line with U+FFFD for the odd byte); it used to panic reading the arguments.
#[test]
fn a_pipeline_path_that_is_not_utf8_runs() {
    use std::os::unix::ffi::OsStrExt;
    let sb = diamond("0");
    let odd = sb.path().join(std::ffi::OsStr::from_bytes(b"odd\xffdir"));
    std::fs::create_dir(&odd).unwrap();
    for f in ["p.yaml", "in.txt"] {
        std::fs::rename(sb.path().join(f), odd.join(f)).unwrap();
    }
    let out = sb.cmd(&["run"]).arg(odd.join("p.yaml")).output().unwrap();
    let r = common::Ran::from(out);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("4 ran, 0 cached, 0 failed"),
        "{}",
        r.stdout
    );
}

#[test]
fn changing_one_param_reruns_only_what_depends_on_it() {
    let sb = diamond("0");
    assert_eq!(sb.run(&["run", "p.yaml"]).code, 0);
    let plan = sb.run(&["plan", "p.yaml", "--set", "params.greeting=bonjour"]);
    insta::assert_snapshot!(plan.stdout);
    let json = sb.run(&[
        "plan",
        "p.yaml",
        "--set",
        "params.greeting=bonjour",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["stages"][2]["status"], "will_run");
    assert_eq!(v["stages"][3]["waits_for"][0], "right");
    let r = sb.run(&["run", "p.yaml", "--set", "params.greeting=bonjour"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(counts(&sb), [1, 1, 2, 2]);
}

#[test]
fn early_cutoff_when_a_rerun_reproduces_its_output() {
    let sb = diamond("0");
    assert_eq!(sb.run(&["run", "p.yaml"]).code, 0);
    // Forcing src reruns it; it reproduces the same bytes, so nothing below reruns.
    let r = sb.run(&["run", "p.yaml", "--force", "src"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(counts(&sb), [2, 1, 1, 1]);
    // --from reruns the stage and everything below it.
    assert_eq!(sb.run(&["run", "p.yaml", "--from", "right"]).code, 0);
    assert_eq!(counts(&sb), [2, 1, 2, 2]);
}

#[test]
fn independent_stages_run_at_the_same_time() {
    let sb = diamond("1");
    let r = sb.run(&["run", "p.yaml", "--jobs", "4"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let run = sb.last_run();
    let (l0, l1) = interval(&run, "left");
    let (r0, r1) = interval(&run, "right");
    assert!(
        l0 < r1 && r0 < l1,
        "left {l0}..{l1} and right {r0}..{r1} do not overlap"
    );
    // With one job they cannot.
    let r = sb.run(&[
        "run",
        "p.yaml",
        "--jobs",
        "1",
        "--set",
        "params.greeting=hi",
        "--force-all",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let run = sb.last_run();
    let (l0, l1) = interval(&run, "left");
    let (r0, r1) = interval(&run, "right");
    assert!(
        l1 <= r0 || r1 <= l0,
        "with --jobs 1 left {l0}..{l1} and right {r0}..{r1} overlap"
    );
}

#[test]
fn sigkill_mid_stage_leaves_no_partial_artifact_and_rerun_redoes_only_that_stage() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        r#"
name: crash
storage: file://store
stages:
  first:
    kind: shell
    with: { run: "echo x >> $PIPELINE_DIR/count-first; echo one > one.txt", outputs: [one.txt] }
  second:
    kind: shell
    inputs: [first]
    with:
      run: echo x >> $PIPELINE_DIR/count-second; head -c 100000 /dev/zero > big.bin; touch $PIPELINE_DIR/writing; sleep 30; echo done > tail.txt
      outputs: [big.bin, tail.txt]
"#,
    );
    let mut child = sb.spawn(&["run", "p.yaml"]);
    assert!(sb.wait_for("writing", 20), "stage `second` never started");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(sb.manifests(), 1, "only `first` may be committed");
    let plan = sb.run(&["plan", "p.yaml"]);
    assert!(
        plan.stdout.contains("first   shell  cached"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains("second  shell  will run"),
        "{}",
        plan.stdout
    );
    // The killed run's record says so.
    let runs = sb.run(&["runs", "--store", "file://store"]);
    assert!(runs.stdout.contains("killed"), "{}", runs.stdout);
    // ... and so does its JSON, which scripts read.
    let json = sb.run(&["runs", "--store", "file://store", "--json"]);
    assert!(
        json.stdout.contains("\"status\": \"killed\""),
        "{}",
        json.stdout
    );
    // The stage it was running was killed with it (not `not selected`, nor `pending`).
    let show = sb.run(&["show", "last", "--store", "file://store"]);
    let second = show
        .stdout
        .lines()
        .find(|l| l.starts_with("second"))
        .unwrap_or("");
    assert!(second.contains("killed"), "{}", show.stdout);
    // ... with the key it was producing, though it had none when the run was planned
    // (`first` had not run): what gc reads to keep its checkpoints.
    let json = sb.run(&["show", "last", "--store", "file://store", "--json"]);
    let record: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let stages = record["stages"].as_array().unwrap();
    let second = stages.iter().find(|s| s["stage"] == "second").unwrap();
    assert!(second["key"].is_string(), "{}", json.stdout);
    assert_eq!(second["status"], "killed", "{}", json.stdout);

    sb.write("p.yaml", &sb.read("p.yaml").replace("sleep 30", "true"));
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        line_count(&sb.read("count-first")),
        1,
        "first must not rerun"
    );
    assert_eq!(line_count(&sb.read("count-second")), 2);
    assert_eq!(stage_status(&sb.last_run(), "first"), "cached");
}

#[test]
fn a_flipped_byte_in_a_blob_is_detected_named_and_repaired() {
    let sb = diamond("0");
    assert_eq!(sb.run(&["run", "p.yaml"]).code, 0);
    let run = sb.last_run();
    let digest = run["stages"][0]["artifact"].as_str().unwrap().to_string();
    let manifest_key = run["stages"][0]["key"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&sb.read(&format!("store/manifests/{manifest_key}.json"))).unwrap();
    let blob_hex = manifest["files"][0]["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("blake3:")
        .unwrap()
        .to_string();
    let blob = sb
        .path()
        .join(format!("store/blobs/{}/{blob_hex}", &blob_hex[..2]));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&blob, bytes).unwrap();

    // A stage reading it on a machine without a local copy fails and names the blob.
    std::fs::remove_dir_all(sb.path().join(".orchestrate/artifacts")).unwrap();
    let r = sb.run(&["run", "p.yaml", "--force", "left"]);
    assert_eq!(
        r.code, 3,
        "the store's failure, not the stage's: {}",
        r.stdout
    );
    assert!(
        r.stdout.contains("corrupt blob") && r.stdout.contains(&blob_hex),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("`a.txt`") && r.stdout.contains("--repair"),
        "{}",
        r.stdout
    );
    // fsck finds it too.
    let f = sb.run(&["fsck", "--store", "file://store"]);
    assert_eq!(f.code, 3, "{}", f.stdout);
    assert!(
        f.stdout.contains(&blob_hex) && f.stdout.contains("stage `src`"),
        "{}",
        f.stdout
    );
    // `plan --repair` says what a repair would rebuild, and changes nothing.
    let r = sb.run(&["plan", "p.yaml", "--repair"]);
    assert!(
        r.stdout.contains("stored artifact was corrupt"),
        "{}",
        r.stdout
    );
    assert!(blob.exists(), "plan deleted the corrupt blob");
    assert_eq!(sb.run(&["fsck", "--store", "file://store"]).code, 3);
    // --repair rebuilds it; the rebuilt artifact has the original digest.
    let r = sb.run(&["run", "p.yaml", "--repair"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(
        sb.last_run()["stages"][0]["artifact"].as_str().unwrap(),
        digest
    );
    assert_eq!(sb.run(&["fsck", "--store", "file://store"]).code, 0);
}

#[test]
fn two_processes_on_one_store_produce_each_artifact_once() {
    let sb = diamond("1");
    let a = sb.spawn(&["run", "p.yaml"]);
    let b = sb.spawn(&["run", "p.yaml"]);
    let a = a.wait_with_output().unwrap();
    let b = b.wait_with_output().unwrap();
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    assert_eq!(counts(&sb), [1, 1, 1, 1]);
    let runs = sb.runs();
    assert_eq!(runs.len(), 2);
    // Between them, every stage ran exactly once.
    for stage in ["src", "left", "right", "join"] {
        let ran = runs
            .iter()
            .filter(|r| stage_status(r, stage) == "ran")
            .count();
        assert_eq!(ran, 1, "stage {stage} ran {ran} times");
    }
}

/// A stage waiting on another run's lock gives its `--jobs` slot to stages that can work:
/// with `--jobs 1`, the second run's independent stage finishes while the first run still
/// produces what both need.
#[test]
fn a_stage_waiting_on_another_run_leaves_its_slot_to_others() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        r#"
name: slots
storage: file://store
stages:
  slow:
    kind: shell
    with:
      # Held until the test says so (at most a minute), however slowly the other run starts.
      run: "touch $PIPELINE_DIR/slow-started; i=0; until [ -e $PIPELINE_DIR/go ] || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done; echo s > s; date +%s%N > $PIPELINE_DIR/slow-done"
      outputs: [s]
  quick:
    kind: shell
    with: { run: "echo q > q; date +%s%N > $PIPELINE_DIR/quick-done", outputs: [q] }
"#,
    );
    let first = sb.spawn(&["run", "p.yaml", "--only", "slow"]);
    assert!(sb.wait_for("slow-started", 30));
    let mut second = sb.spawn(&["run", "p.yaml", "--jobs", "1"]);
    // Its log, read as it comes: `slow` is let go only once the second run waits on it,
    // else the first could finish in the moment between `quick` and the second's `slow`,
    // which would then find it stored and never wait.
    let (waiting_tx, waiting_rx) = std::sync::mpsc::channel();
    let log = second.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(log).lines().map_while(Result::ok) {
            if line.contains("stage `slow`: waiting for run") {
                let _ = waiting_tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let waited = waiting_rx.recv_timeout(std::time::Duration::from_secs(60));
    let quick_first = sb.wait_for("quick-done", 60);
    sb.write("go", "");
    let status = second.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert!(
        waited.is_ok(),
        "the second run never waited on `slow`: {stderr}"
    );
    assert!(quick_first, "`quick` waited for the other run's `slow`");
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(status.success(), "{stderr}");
    let at = |f: &str| sb.read(f).trim().parse::<u128>().unwrap();
    assert!(
        at("quick-done") < at("slow-done"),
        "`quick` waited for the other run's `slow`"
    );
    assert_eq!(stage_status(&sb.last_run(), "slow"), "cached");
}

#[test]
fn retries_then_success_and_timeouts() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        r#"
name: flaky
storage: file://store
stages:
  flaky:
    kind: shell
    retries: 2
    with:
      run: echo x >> $PIPELINE_DIR/tries; test $(wc -l < $PIPELINE_DIR/tries) -ge 2 && echo ok > ok.txt
      outputs: [ok.txt]
  slow:
    kind: shell
    timeout: 1s
    with: { run: sleep 30 }
"#,
    );
    let t0 = Instant::now();
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 1);
    assert!(t0.elapsed() < Duration::from_secs(20));
    let run = sb.last_run();
    assert_eq!(stage_status(&run, "flaky"), "ran");
    assert_eq!(run["stages"][0]["attempts"], 2);
    assert_eq!(stage_status(&run, "slow"), "failed");
    assert!(r.stdout.contains("timed out after 1.0s"), "{}", r.stdout);
}

#[test]
fn ctrl_c_stops_cleanly_with_exit_130() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        r#"
name: stop
storage: file://store
stages:
  long:
    kind: shell
    with: { run: "touch $PIPELINE_DIR/started; sleep 60; echo > x", outputs: [x] }
"#,
    );
    let child = sb.spawn(&["run", "p.yaml"]);
    assert!(sb.wait_for("started", 20));
    let t0 = Instant::now();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Well before the 60 s the command would take, with room for a loaded machine.
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert_eq!(sb.manifests(), 0);
    assert_eq!(sb.last_run()["status"], "cancelled");
}

#[test]
fn only_runs_just_that_stage_and_needs_its_inputs_stored() {
    let sb = diamond("0");
    let r = sb.run(&["run", "p.yaml", "--only", "left"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("stage `left` needs `src`, which is not in the store"),
        "{}",
        r.stderr
    );
    assert_eq!(sb.run(&["run", "p.yaml", "--only", "src"]).code, 0);
    assert_eq!(sb.run(&["run", "p.yaml", "--only", "left"]).code, 0);
    assert_eq!(counts(&sb), [1, 1, 0, 0]);
    let r = sb.run(&["run", "p.yaml", "--only", "lefty"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("did you mean `left`?"), "{}", r.stderr);
    // Every unknown name at once, before the store is looked at (this one cannot be
    // reached): the command line's mistake, not the store's.
    let r: common::Ran = sb
        .cmd(&[
            "plan",
            "p.yaml",
            "--until",
            "left",
            "--until",
            "zz",
            "--force",
            "qq",
            "--store",
            "s3://nowhere/p",
        ])
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("ORCHESTRATE_STORE_RETRIES", "0")
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 2, "{}", r.stderr);
    for says in [
        "unknown stage `zz` in --until",
        "unknown stage `qq` in --force",
    ] {
        assert!(r.stderr.contains(says), "{}", r.stderr);
    }
    // A stage forced that the selection leaves out would be passed over without a word.
    let r = sb.run(&["plan", "p.yaml", "--only", "left", "--force", "join"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "--force join names a stage the selection (--only, --until, --from) leaves out"
        ),
        "{}",
        r.stderr
    );
}

#[test]
fn gc_keeps_what_kept_and_pinned_runs_use() {
    let sb = diamond("0");
    assert_eq!(
        sb.run(&["run", "p.yaml", "--set", "params.greeting=one"])
            .code,
        0
    );
    let first = sb.last_run()["id"].as_str().unwrap().to_string();
    assert_eq!(
        sb.run(&["run", "p.yaml", "--set", "params.greeting=two"])
            .code,
        0
    );
    assert_eq!(
        sb.run(&["run", "p.yaml", "--set", "params.greeting=three"])
            .code,
        0
    );
    assert_eq!(sb.manifests(), 2 + 3 * 2);
    // One artifact by its key's first characters, as `show` prints keys: pinned, unpinned.
    let key = sb.last_run()["stages"][0]["key"].as_str().unwrap()[..12].to_string();
    let r = sb.run(&["pin", &key, "--store", "file://store"]);
    assert!(
        r.stdout.contains("pinned 1 artifact"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    let r = sb.run(&["unpin", &key, "--store", "file://store"]);
    assert!(
        r.stdout.contains("unpinned 1 artifact"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    let r = sb.run(&["pin", "0123456789abcdef", "--store", "file://store"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("no stored artifact whose cache key begins"),
        "{}",
        r.stderr
    );
    assert_eq!(sb.run(&["pin", &first, "--store", "file://store"]).code, 0);
    let r = sb.run(&[
        "gc",
        "--store",
        "file://store",
        "--keep-last",
        "1",
        "--grace",
        "0",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The pinned run's record stays with its pins.
    assert!(
        r.stdout.contains("kept 2 runs") && r.stdout.contains("deleted 1 run, 2 artifacts"),
        "{}",
        r.stdout
    );
    assert!(sb.path().join(format!("store/runs/{first}.json")).exists());
    // The local cache's copy of the one input collected (`right` greeting two, which `join`
    // read) goes with it.
    assert!(
        r.stdout.contains(
            "local cache: deleted 0 working folders of runs over and 1 downloaded artifact the store no longer keeps"
        ),
        "{}",
        r.stdout
    );
    let copies = std::fs::read_dir(sb.path().join(".orchestrate/artifacts"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(copies, 4);
    // A failed run keeps its working folders, for reading, until gc finds it over.
    let failed = sb.run(&["run", "p.yaml", "--set", "left.with.run=exit 3"]);
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    let work = sb.path().join(".orchestrate/work");
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 1);
    let r = sb.run(&["gc", "--store", "file://store", "--grace", "0"]);
    assert!(
        r.stdout
            .contains("local cache: deleted 1 working folder of runs over"),
        "{}",
        r.stdout
    );
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
    // The newest and the pinned run are still fully cached.
    for greeting in ["three", "one"] {
        let plan = sb.run(&[
            "plan",
            "p.yaml",
            "--set",
            &format!("params.greeting={greeting}"),
        ]);
        assert!(
            plan.stdout.contains("4 cached"),
            "{greeting}: {}",
            plan.stdout
        );
    }
    let plan = sb.run(&["plan", "p.yaml", "--set", "params.greeting=two"]);
    assert!(
        plan.stdout.contains("right  shell  will run"),
        "{}",
        plan.stdout
    );
    assert_eq!(sb.run(&["fsck", "--store", "file://store"]).code, 0);
}

/// Pins belong to who pinned them: unpinning one run leaves pinned what another pinned run
/// shares with it. `gc --pipeline` collects that pipeline's runs alone, in a store others
/// share; and `plan` says an artifact was collected rather than "never run".
#[test]
fn unpinning_a_run_and_gc_of_one_pipeline_spare_what_others_keep() {
    let sb = diamond("0");
    sb.write(
        "other.yaml",
        "name: other\nstorage: file://store\nstages:\n  solo:\n    kind: shell\n    with: { run: echo solo > s.txt, outputs: [s.txt] }\n",
    );
    assert_eq!(sb.run(&["run", "other.yaml"]).code, 0);
    let ids = run_greetings(&sb, &["one", "two"]);
    for id in &ids {
        assert_eq!(sb.run(&["pin", id, "--store", "file://store"]).code, 0);
    }
    // Run one's `src` and `left` are run two's too: they stay pinned by run two.
    let r = sb.run(&["unpin", &ids[0], "--store", "file://store"]);
    assert!(r.stdout.contains("unpinned 4 artifacts"), "{}", r.stdout);
    let gc = [
        "gc",
        "--pipeline",
        "p.yaml",
        "--keep-last",
        "0",
        "--grace",
        "0",
    ];
    let r = sb.run(&gc);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("deleted 1 run, 2 artifacts"),
        "{}",
        r.stdout
    );
    let plan = sb.run(&["plan", "p.yaml", "--set", "params.greeting=two"]);
    assert!(plan.stdout.contains("4 cached"), "{}", plan.stdout);
    let plan = sb.run(&["plan", "other.yaml"]);
    assert!(plan.stdout.contains("1 cached"), "{}", plan.stdout);
    let plan = sb.run(&["plan", "p.yaml", "--set", "params.greeting=one"]);
    assert!(plan.stdout.contains("collected by gc"), "{}", plan.stdout);

    // `unpin KEY` unpins the artifact whoever pinned it, and says who did.
    let key = sb.stage_manifest("left")["key"]
        .as_str()
        .unwrap()
        .to_string();
    let r = sb.run(&["unpin", &key, "--store", "file://store"]);
    assert!(
        r.stdout.contains("unpinned 1 artifact") && r.stdout.contains(&ids[1]),
        "{}",
        r.stdout
    );
    // A run id whose record is gone still names its pins.
    std::fs::remove_file(sb.path().join(format!("store/runs/{}.json", ids[1]))).unwrap();
    let r = sb.run(&["unpin", &ids[1], "--store", "file://store"]);
    assert!(
        r.stdout.contains("unpinned 3 artifacts"),
        "{}{}",
        r.stdout,
        r.stderr
    );
}

/// A run record that does not parse (a truncated write) stops nothing: gc collects it by
/// age like any other, and `gc --pipeline`, not knowing whose it is, keeps it.
#[test]
fn gc_passes_over_an_unreadable_run_record() {
    let sb = diamond("0");
    let first = run_greetings(&sb, &["one", "two"]).remove(0);
    let record = sb.path().join(format!("store/runs/{first}.json"));
    std::fs::write(&record, "{\"id\": \"trunc").unwrap();
    let r = sb.run(&[
        "gc",
        "--pipeline",
        "p.yaml",
        "--keep-last",
        "0",
        "--grace",
        "0",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(record.exists(), "whose it is is unknown: kept");
    let r = sb.run(&[
        "gc",
        "--store",
        "file://store",
        "--keep-last",
        "0",
        "--grace",
        "0",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!record.exists(), "collected by age");
}

/// A kept run record this version cannot parse (a newer version's, in a shared store) keeps
/// what its stages name, read as plain JSON; one that names no stages keeps every artifact.
#[test]
fn gc_keeps_what_a_kept_record_it_cannot_parse_names() {
    let sb = diamond("0");
    let ids = run_greetings(&sb, &["one", "two"]);
    let manifests = sb.manifests();
    let record = sb.path().join(format!("store/runs/{}.json", ids[1]));
    let newer = std::fs::read_to_string(&record)
        .unwrap()
        .replace("\"succeeded\"", "\"partial\"");
    assert!(newer.contains("partial"), "{newer}");
    std::fs::write(&record, newer).unwrap();
    let gc = |keep: &str| {
        let r = sb.run(&[
            "gc",
            "--store",
            "file://store",
            "--keep-last",
            keep,
            "--grace",
            "0",
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        r.stdout
    };
    // The first run's own artifacts go; the second's, named by the record, stay.
    let out = gc("1");
    assert!(out.contains("deleted 1 run"), "{out}");
    assert!(sb.manifests() < manifests, "{out}");
    let left = sb.manifests();
    let plan = sb.run(&["plan", "p.yaml", "--set", "params.greeting=two"]);
    assert!(
        plan.stdout.contains("4 cached, 0 will run"),
        "{}",
        plan.stdout
    );
    // Not even a list of stages: what it uses is unknown, so nothing goes.
    std::fs::write(&record, "{\"id\": 1}").unwrap();
    let out = gc("1");
    assert!(out.contains("what it uses is unknown"), "{out}");
    assert_eq!(sb.manifests(), left, "{out}");
}

/// Damaged records beside the artifacts (a run record, a history entry) stop neither `runs`
/// nor a run; `fsck` names them and `fsck --repair` removes them.
#[test]
fn damaged_run_records_and_history_are_passed_over_and_repaired() {
    let sb = diamond("0");
    let ids = run_greetings(&sb, &["one", "two"]);
    std::fs::write(sb.path().join(format!("store/runs/{}.json", ids[0])), "{").unwrap();
    let history = sb.path().join("store/history");
    let entry = walk(&history).into_iter().next().expect("a history entry");
    std::fs::write(&entry, "not json").unwrap();

    let r = sb.run(&["runs", "--store", "file://store"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains(&ids[1][..8]), "{}", r.stdout);
    assert!(r.stderr.contains("unreadable"), "{}", r.stderr);
    let r = sb.run(&["run", "p.yaml", "--set", "params.greeting=three"]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let r = sb.run(&["fsck", "--store", "file://store"]);
    assert_eq!(r.code, 3, "{}", r.stdout);
    assert!(
        r.stdout.contains("corrupt: run record") && r.stdout.contains("corrupt: history entry"),
        "{}",
        r.stdout
    );
    assert_eq!(
        sb.run(&["fsck", "--store", "file://store", "--repair"])
            .code,
        0
    );
    assert_eq!(sb.run(&["fsck", "--store", "file://store"]).code, 0);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            files.extend(walk(&e.path()));
        } else {
            files.push(e.path());
        }
    }
    files
}

#[test]
fn a_kept_artifact_with_an_unreadable_manifest_stops_gc_and_fsck_repairs_it() {
    let sb = diamond("0");
    assert_eq!(sb.run(&["run", "p.yaml"]).code, 0);
    let key = sb.stage_manifest("left")["key"]
        .as_str()
        .unwrap()
        .to_string();
    let blobs = || {
        std::fs::read_dir(sb.path().join("store/blobs"))
            .unwrap()
            .count()
    };
    let before = blobs();
    // The manifest's file list edited: its digest no longer matches.
    let path = format!("store/manifests/{key}.json");
    let mut manifest: serde_json::Value = serde_json::from_str(&sb.read(&path)).unwrap();
    manifest["files"][0]["size"] = serde_json::json!(12345);
    sb.write(&path, &manifest.to_string());
    let r = sb.run(&["gc", "--store", "file://store", "--grace", "0"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("manifest"), "{}", r.stderr);
    assert_eq!(
        blobs(),
        before,
        "gc deleted files while a kept manifest was unreadable"
    );
    // `run` says which stage's manifest is damaged and what mends it; `run --repair`
    // sets it aside and reruns that stage. (Written back damaged after, for fsck below.)
    let damaged = sb.read(&path);
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("the stored manifest of stage `left` is damaged")
            && r.stderr.contains("--repair"),
        "{}",
        r.stderr
    );
    let r = sb.run(&["run", "p.yaml", "--repair"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(stage_status(&sb.last_run(), "left"), "ran");
    sb.write(&path, &damaged);
    let f = sb.run(&["fsck", "--store", "file://store"]);
    assert_eq!(f.code, 3, "{}", f.stderr);
    assert!(
        f.stdout.contains("corrupt: manifest of key"),
        "{}",
        f.stdout
    );
    assert_eq!(
        sb.run(&["fsck", "--store", "file://store", "--repair"])
            .code,
        0
    );
    assert_eq!(sb.run(&["fsck", "--store", "file://store"]).code, 0);
    let plan = sb.run(&["plan", "p.yaml"]);
    assert!(
        plan.stdout.contains("left   shell  will run"),
        "{}",
        plan.stdout
    );
}

#[test]
fn runs_and_show_look_at_the_pipeline_given() {
    let sb = diamond("0");
    assert_eq!(sb.run(&["run", "p.yaml"]).code, 0);
    sb.write(
        "other.yaml",
        &sb.read("p.yaml").replacen("name: ", "name: other-", 1),
    );
    assert_eq!(sb.run(&["run", "other.yaml"]).code, 0);
    let runs = sb.run(&["runs", "--pipeline", "p.yaml", "--json"]);
    let runs: serde_json::Value = serde_json::from_str(&runs.stdout).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
    let show = sb.run(&["show", "last", "--pipeline", "p.yaml", "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(shown["id"], runs[0]["id"]);
    assert_ne!(shown["pipeline"], sb.last_run()["pipeline"]);
    let all = sb.run(&["runs", "--store", "file://store", "--json"]);
    let all: serde_json::Value = serde_json::from_str(&all.stdout).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2);
}

#[test]
fn graph_output() {
    let sb = diamond("0");
    let dot = sb.run(&["graph", "p.yaml", "--format", "dot"]);
    insta::assert_snapshot!("graph_dot", dot.stdout);
    let mermaid = sb.run(&["graph", "p.yaml", "--format", "mermaid"]);
    insta::assert_snapshot!("graph_mermaid", mermaid.stdout);
}

#[test]
fn runs_and_show_describe_what_happened() {
    let sb = diamond("0");
    assert_eq!(sb.run(&["run", "p.yaml"]).code, 0);
    assert_eq!(sb.run(&["run", "p.yaml"]).code, 0);
    let runs = sb.run(&["runs", "--pipeline", "p.yaml"]);
    assert_eq!(line_count(&runs.stdout), 3, "{}", runs.stdout);
    let show = sb.run(&["show", "last", "--pipeline", "p.yaml"]);
    assert!(
        show.stdout.contains("status    succeeded"),
        "{}",
        show.stdout
    );
    assert!(show.stdout.contains("produced by run"), "{}", show.stdout);
    let json = sb.run(&["show", "last", "--store", "file://store", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["pipeline_digest"].as_str().unwrap().len(), 16);
}

#[test]
fn key_order_in_yaml_does_not_change_cache_keys() {
    let a = Sandbox::new();
    a.write(
        "p.yaml",
        "name: k\nstorage: file://store\nstages:\n  s:\n    kind: shell\n    with: { run: echo hi > x, outputs: [x], env: { A: '1', B: '2' } }\n",
    );
    let b = Sandbox::new();
    b.write(
        "p.yaml",
        "stages:\n  s:\n    with:\n      env: { B: '2', A: '1' }\n      outputs: [x]\n      run: echo hi > x\n    kind: shell\nstorage: file://store\nname: k\n",
    );
    let key = |sb: &Sandbox| {
        let r = sb.run(&["plan", "p.yaml", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        v["stages"][0]["key"].as_str().unwrap().to_string()
    };
    assert_eq!(key(&a), key(&b));
    // A default written out is the same as a default left out.
    a.write("p.yaml", "name: k\nstorage: file://store\nstages:\n  s: { kind: shell, with: { run: echo, env: {}, outputs: [] } }\n");
    b.write(
        "p.yaml",
        "name: k\nstorage: file://store\nstages:\n  s: { kind: shell, with: { run: echo } }\n",
    );
    assert_eq!(key(&a), key(&b));
    // Settings merged from an anchor (`<<: *d`, kept under an `x-` key) are the same as
    // settings written out; the stage's own win.
    a.write("p.yaml", "name: k\nstorage: file://store\nx-defaults: &d { kind: shell, with: { run: echo } }\nstages:\n  s: { <<: *d, with: { run: echo hi } }\n");
    b.write(
        "p.yaml",
        "name: k\nstorage: file://store\nstages:\n  s: { kind: shell, with: { run: echo hi } }\n",
    );
    assert_eq!(key(&a), key(&b));
}

/// Inputs are shared through the local cache. A stage that writes into one, or adds a file
/// to it, fails (its output is not made from the bytes its key names), and a later stage is
/// given the stored artifact, not the changed copy.
#[test]
fn a_stage_that_writes_into_its_input_fails_and_does_not_change_it_for_later_stages() {
    for tamper in ["echo tampered >> $INPUT_A/x", "touch $INPUT_A/extra"] {
        let sb = Sandbox::new();
        let pipeline = format!(
            r#"
name: tamper
storage: file://store
stages:
  a:
    kind: shell
    with: {{ run: echo original > x, outputs: [x] }}
  b:
    kind: shell
    inputs: [a]
    with:
      run: {tamper}; echo done > y
      outputs: [y]
"#
        );
        sb.write("p.yaml", &pipeline);
        let r = sb.run(&["run", "p.yaml"]);
        assert_eq!(r.code, 1, "{tamper}: {}\n{}", r.stdout, r.stderr);
        let all = format!("{}{}", r.stdout, r.stderr);
        assert!(
            all.contains("input `a` (")
                && all.contains("changed while stage `b` ran: a stage wrote into it"),
            "{tamper}: {all}"
        );
        assert_eq!(sb.manifests(), 1, "{tamper}: only a's output is stored");
        // The reader fails if it is given the added file; its copy must be a's output.
        let reader = "  c:\n    kind: shell\n    inputs: [a]\n    with: { run: test ! -e $INPUT_A/extra && cp $INPUT_A/x z, outputs: [z] }\n";
        let (head, _) = pipeline.split_once("  b:").unwrap();
        sb.write("p.yaml", &format!("{head}{reader}"));
        let r = sb.run(&["run", "p.yaml"]);
        assert_eq!(r.code, 0, "{tamper}: {}\n{}", r.stdout, r.stderr);
        let run = sb.last_run();
        assert_eq!(stage_status(&run, "a"), "cached");
        assert_eq!(stage_status(&run, "c"), "ran");
        let z = &sb.stage_manifest("c")["files"][0]["digest"];
        let x = &sb.stage_manifest("a")["files"][0]["digest"];
        assert_eq!(z, x, "{tamper}: c was given a changed copy of a's output");
    }
}

/// Two stages read one input folder at once (`--jobs`); one rewrites a file in it (same
/// size, `sed -i`), and the other copies it after. Neither output is stored: the reader's
/// was made from bytes its key does not name.
#[test]
fn a_stage_reading_an_input_another_rewrites_beside_it_is_not_stored() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        r#"
name: beside
storage: file://store
stages:
  a:
    kind: shell
    with: { run: echo original > x, outputs: [x] }
  b:
    kind: shell
    inputs: [a]
    with:
      # Once `c` has been given the folder (at most a minute's wait).
      run: "i=0; until [ -e $PIPELINE_DIR/c-has-input ] || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done; sed -i s/original/tampered/ $INPUT_A/x; echo done > y"
      outputs: [y]
  c:
    kind: shell
    inputs: [a]
    with:
      run: "touch $PIPELINE_DIR/c-has-input; i=0; until grep -q tampered $INPUT_A/x || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done; cp $INPUT_A/x z"
      outputs: [z]
"#,
    );
    let r = sb.run(&["run", "p.yaml", "--jobs", "4"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let all = format!("{}{}", r.stdout, r.stderr);
    for stage in ["b", "c"] {
        assert!(
            all.contains(&format!("changed while stage `{stage}` ran")),
            "{stage}: {all}"
        );
    }
    assert_eq!(sb.manifests(), 1, "only a's output is stored: {all}");
}

/// A stage writes into its input, and a stage starting after that finds the folder changed
/// and fetches it again: the writer still fails (its folder is no longer what it was
/// given), and the later stage gets the stored bytes.
#[test]
fn a_write_hidden_by_a_fresh_download_still_fails_the_writer() {
    let sb = Sandbox::new();
    let wait = |file: &str| {
        format!("i=0; until [ -e $PIPELINE_DIR/{file} ] || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done")
    };
    sb.write(
        "p.yaml",
        &format!(
            r#"
name: hidden
storage: file://store
stages:
  a:
    kind: shell
    with: {{ run: echo original > x, outputs: [x] }}
  d:
    kind: shell
    with: {{ run: "{}; echo > d", outputs: [d] }}
  b:
    kind: shell
    inputs: [a]
    with: {{ run: "echo tampered >> $INPUT_A/x; touch $PIPELINE_DIR/b-wrote; {}; echo > y", outputs: [y] }}
  c:
    kind: shell
    inputs: [a, d]
    with: {{ run: "touch $PIPELINE_DIR/c-started; cp $INPUT_A/x z", outputs: [z] }}
"#,
            wait("b-wrote"),
            wait("c-started")
        ),
    );
    let r = sb.run(&["run", "p.yaml", "--jobs", "3"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(all.contains("changed while stage `b` ran"), "{all}");
    let z = &sb.stage_manifest("c")["files"][0]["digest"];
    let x = &sb.stage_manifest("a")["files"][0]["digest"];
    assert_eq!(z, x, "c was given the changed copy");
}

/// An `INPUT_*` the orchestrator inherited (a stage running a pipeline of its own) names
/// folders outside the stage's key: the command sees only its own inputs.
#[test]
fn an_inherited_input_variable_does_not_reach_the_command() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        r#"
name: nested
storage: file://store
stages:
  a:
    kind: shell
    with: { run: "echo ${INPUT_A:-unset} ${INPUT_STALE:-unset} > o", outputs: [o] }
"#,
    );
    let out = sb
        .cmd(&["run", "p.yaml"])
        .env("INPUT_STALE", "/stale/dir")
        .env("INPUT_A", "/other/dir")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o = &sb.stage_manifest("a")["files"][0];
    assert_eq!(o["size"], "unset unset\n".len(), "{o}");
}

/// A tool a stage builds keeps its executable bit through the store, for the stage that
/// runs it; a plain file's manifest entry is as before (its artifact digest unchanged).
#[test]
fn an_executable_output_is_given_back_executable() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        r#"
name: tools
storage: file://store
stages:
  build:
    kind: shell
    with:
      run: "printf '#!/bin/sh\necho hi\n' > tool; chmod +x tool; echo plain > notes"
      outputs: [tool, notes]
  use:
    kind: shell
    inputs: { b: build }
    with: { run: "$INPUT_B/tool > o", outputs: [o] }
"#,
    );
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let m = sb.stage_manifest("build");
    let files = m["files"].as_array().unwrap();
    let entry = |name: &str| files.iter().find(|f| f["path"] == name).unwrap().clone();
    assert_eq!(entry("tool")["executable"], true, "{m}");
    assert!(entry("notes").get("executable").is_none(), "{m}");
    let o = &sb.stage_manifest("use")["files"][0];
    assert_eq!(o["size"], 3, "the tool ran: {o}");
}

/// A file the key names that changes while its stage runs (a `git pull` mid-run, say):
/// the output was made from other bytes than the key names, so it is not stored.
#[test]
fn a_dependency_that_changes_while_its_stage_runs_is_not_stored_under_the_old_key() {
    let sb = Sandbox::new();
    let pipeline = r#"
name: moving
storage: file://store
stages:
  src:
    kind: shell
    deps: [in.txt]
    with:
      run: cp $PIPELINE_DIR/in.txt a.txt; EDIT
      outputs: [a.txt]
"#;
    sb.write("in.txt", "first\n");
    sb.write(
        "p.yaml",
        &pipeline.replace("EDIT", "echo second >> $PIPELINE_DIR/in.txt"),
    );
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(
        all.contains("`in.txt` changed while stage `src` ran"),
        "{all}"
    );
    assert_eq!(sb.manifests(), 0, "nothing is stored under the old key");
    // Once the file holds still, the stage runs and stores what it now reads.
    sb.write("p.yaml", &pipeline.replace("EDIT", "true"));
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(stage_status(&sb.last_run(), "src"), "ran");
}

/// A link in an output folder to a folder, or to nothing, cannot be stored: the stage
/// fails naming it, rather than storing the artifact without it.
#[test]
fn links_in_an_output_folder_that_cannot_be_stored_are_named() {
    for (link, says) in [
        (
            "ln -s $PIPELINE_DIR d/elsewhere",
            "`d/elsewhere` is a link to a folder outside the output",
        ),
        (
            "ln -s /no/such/file d/elsewhere",
            "`d/elsewhere` is a link to nothing",
        ),
    ] {
        let sb = Sandbox::new();
        sb.write(
            "p.yaml",
            &format!(
                "name: links\nstorage: file://store\nstages:\n  a:\n    kind: shell\n    with: {{ run: 'mkdir d && echo x > d/f && {link}', outputs: [d] }}\n"
            ),
        );
        let r = sb.run(&["run", "p.yaml"]);
        assert_eq!(r.code, 1, "{link}: {}\n{}", r.stdout, r.stderr);
        let all = format!("{}{}", r.stdout, r.stderr);
        assert!(all.contains(says), "{link}: {all}");
        assert_eq!(sb.manifests(), 0, "{link}");
    }
    // One to a folder inside the output (a virtualenv's `lib64 -> lib`) is passed over:
    // the folder itself is stored.
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        "name: links\nstorage: file://store\nstages:\n  a:\n    kind: shell\n    with: { run: 'mkdir -p d/lib && echo x > d/lib/f && ln -s lib d/lib64', outputs: [d] }\n",
    );
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let files = sb.stage_manifest("a")["files"].to_string();
    assert!(
        files.contains("d/lib/f") && !files.contains("lib64"),
        "{files}"
    );
}

/// A shell command sees its stage's name (`$STAGE`), so the name is part of its key: two
/// stages alike but for their names are two artifacts, and a rename reruns the stage.
/// Stages that never show a name (ingest, bpe, train, quantize) keep their keys.
#[test]
fn a_name_the_output_shows_is_part_of_the_key() {
    let sb = Sandbox::new();
    let pipeline = r#"
name: names
storage: file://store
stages:
  first:
    kind: shell
    with: { run: echo $STAGE > n, outputs: [n] }
  second:
    kind: shell
    with: { run: echo $STAGE > n, outputs: [n] }
"#;
    sb.write("p.yaml", pipeline);
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let run = sb.last_run();
    assert_eq!(stage_status(&run, "first"), "ran");
    assert_eq!(stage_status(&run, "second"), "ran");
    let digest = |stage: &str| sb.stage_manifest(stage)["files"][0]["digest"].clone();
    assert_ne!(digest("first"), digest("second"));

    sb.write("p.yaml", &pipeline.replace("second:", "renamed:"));
    let plan = sb.run(&["plan", "p.yaml"]);
    assert!(
        plan.stdout
            .lines()
            .any(|l| l.starts_with("renamed") && l.contains("will run")),
        "{}\n{}",
        plan.stdout,
        plan.stderr
    );
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(stage_status(&sb.last_run(), "first"), "cached");
    assert_eq!(stage_status(&sb.last_run(), "renamed"), "ran");
}

/// Killed outright, the orchestrator can signal nobody. What its command started must not
/// live on (writing into a working directory the next run reuses): the kernel ends `sh`,
/// and a guardian in the command's process group ends the rest.
#[test]
fn sigkill_takes_down_what_the_command_started() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        r#"
name: orphans
storage: file://store
stages:
  busy:
    kind: shell
    with:
      # Written whole, then renamed: the test never reads it half-written.
      run: sleep 60 & echo $! > $PIPELINE_DIR/orphan.tmp; mv $PIPELINE_DIR/orphan.tmp $PIPELINE_DIR/orphan; sleep 60; echo done > a
      outputs: [a]
"#,
    );
    let mut child = sb.spawn(&["run", "p.yaml"]);
    assert!(sb.wait_for("orphan", 20), "the stage never started");
    let pid = sb.read("orphan").trim().to_string();
    assert!(pid.parse::<u32>().is_ok(), "`{pid}` is not a pid");
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    };
    assert!(alive(), "the background process should be running");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !alive(),
        "process {pid}, started by the command, outlived the orchestrator"
    );
}

/// A stage that times out is stopped in full, even when what it started in the background
/// ignores SIGTERM and holds its output open: the run ends at once, not when that process
/// would have.
#[test]
fn a_timed_out_stage_stops_what_ignores_sigterm() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        r#"
name: stubborn
storage: file://store
stages:
  stubborn:
    kind: shell
    timeout: 1s
    with:
      run: sh -c 'trap "" TERM; sleep 40' & sleep 40
      outputs: []
"#,
    );
    let t0 = Instant::now();
    let r = sb.run(&["run", "p.yaml"]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("timed out"), "{}", r.stderr);
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the run waited {:?} for a process that ignored SIGTERM",
        t0.elapsed()
    );
}

/// The command gets the signals a program expects: a shell starts its background jobs with
/// SIGINT and SIGQUIT ignored, and the wrapper it runs under must give them back. (Signals
/// the test itself was started with ignored, such as SIGHUP under `nohup`, are passed on.)
#[test]
fn the_command_starts_with_sigint_and_sigquit_at_their_defaults() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        r#"
name: signals
storage: file://store
stages:
  check:
    kind: shell
    with:
      run: grep SigIgn /proc/self/status > s; test $(( 0x$(cut -f2 s) & 6 )) -eq 0
      outputs: [s]
"#,
    );
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
}

/// A stage whose output changed under one key (it reads a file it does not declare): `run`
/// keeps the stored output, and `--force` replaces it, so the stages below get the new one.
#[test]
fn force_replaces_an_output_that_changed_under_one_key() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        "name: f\nstorage: file://store\nstages:\n  a: { kind: shell, with: { run: cat $PIPELINE_DIR/ext.txt > o, outputs: [o] } }\n  b: { kind: shell, inputs: { a: a }, with: { run: cp $INPUT_A/o o, outputs: [o] } }\n",
    );
    sb.write("ext.txt", "v1\n");
    assert_eq!(sb.run(&["run", "p.yaml"]).code, 0);
    sb.write("ext.txt", "v2\n");
    let r = sb.run(&["run", "p.yaml", "--force", "a"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(all.contains("--force replaced it"), "{all}");
    let b = sb.stage_manifest("b");
    let hex = b["files"][0]["digest"].as_str().unwrap();
    let hex = hex.trim_start_matches("blake3:");
    let blob = sb.read(&format!("store/blobs/{}/{hex}", &hex[..2]));
    assert_eq!(blob, "v2\n");
    // And the next plain run finds it stored.
    let r = sb.run(&["run", "p.yaml"]);
    assert_eq!(stage_status(&sb.last_run(), "a"), "cached", "{}", r.stderr);

    // `--from` reruns without replacing, and a pinned artifact is never replaced.
    let stored = || {
        sb.stage_manifest("a")["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let v2 = stored();
    sb.write("ext.txt", "v3\n");
    let r = sb.run(&["run", "p.yaml", "--from", "a"]);
    assert!(format!("{}{}", r.stdout, r.stderr).contains("keeping the stored one"));
    assert_eq!(stored(), v2);
    assert_eq!(sb.run(&["pin", "last", "--store", "file://store"]).code, 0);
    let r = sb.run(&["run", "p.yaml", "--force", "a"]);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(
        all.contains("keeping the stored one: it is pinned (`orchestrate unpin "),
        "{all}"
    );
    assert_eq!(stored(), v2);
}

/// An environment variable is text: a shell stage's `env` takes a value YAML would type
/// (a number, an empty default) as it is written.
#[test]
fn shell_env_takes_values_as_written() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        "name: e\nstorage: file://store\nstages:\n  s:\n    kind: shell\n    with:\n      run: echo \"[$A][$B][$C][$D]\" > o\n      outputs: [o]\n      env: { A: 3.10, B: \"${env.B_VALUE:-}\", C: \"${env.C_VALUE}\", D: \"${env.D_VALUE:-dflt}\" }\n",
    );
    let r = sb
        .cmd(&["run", "p.yaml"])
        .env("C_VALUE", "0x10")
        .env("D_VALUE", "")
        .env_remove("B_VALUE")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m = sb.stage_manifest("s");
    let hex = m["files"][0]["digest"].as_str().unwrap();
    let hex = hex.trim_start_matches("blake3:");
    assert_eq!(
        sb.read(&format!("store/blobs/{}/{hex}", &hex[..2])),
        "[3.10][][0x10][dflt]\n"
    );
    // Wherever text is wanted: the pipeline's `name`, a command, an output's name.
    sb.write(
        "q.yaml",
        "name: ${env.V}\nstorage: file://store\nstages:\n  s:\n    kind: shell\n    with: { run: \"${env.CMD}\", outputs: [\"${env.V}\"] }\n",
    );
    let r = sb
        .cmd(&["plan", "q.yaml", "--json"])
        .env("V", "1.10")
        .env("CMD", "true")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(plan["pipeline"], "1.10");
}

/// `verify` tells a stage that is not deterministic from one below it whose input changed,
/// and says which stage failed when the re-execution does.
#[test]
fn verify_names_the_stage_at_fault() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        "name: v\nstorage: file://store\nstages:\n  a: { kind: shell, with: { run: 'date +%N > o', outputs: [o] } }\n  b: { kind: shell, inputs: [a], with: { run: 'cat $INPUT_A/o > p', outputs: [p] } }\n",
    );
    assert_eq!(sb.run(&["run", "p.yaml"]).code, 0);
    let r = sb.run(&["verify", "p.yaml"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("not deterministic: `a`")
            && r.stderr.contains("differ because their inputs did: `b`"),
        "{}",
        r.stderr
    );
    sb.write(
        "q.yaml",
        "name: q\nstorage: file://store\nstages:\n  f: { kind: shell, with: { run: 'test -f $PIPELINE_DIR/flag && echo ok > o', outputs: [o] } }\n",
    );
    sb.write("flag", "");
    assert_eq!(sb.run(&["run", "q.yaml"]).code, 0);
    std::fs::remove_file(sb.path().join("flag")).unwrap();
    let r = sb.run(&["verify", "q.yaml"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("stage `f` failed on re-execution"),
        "{}",
        r.stderr
    );
}

/// `verify --stage S` re-executes S and what it needs, not the rest of the pipeline (which
/// could be a whole training); `run --until S` selects the same.
#[test]
fn verify_of_one_stage_reexecutes_only_what_it_needs() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        "name: v\nstorage: file://store\nstages:\n  a: { kind: shell, with: { run: echo a > o, outputs: [o] } }\n  b: { kind: shell, inputs: { a: a }, with: { run: cp $INPUT_A/o o, outputs: [o] } }\n  other: { kind: shell, with: { run: echo x >> $PIPELINE_DIR/ran; echo x > o, outputs: [o] } }\n",
    );
    // Nothing stored yet: verify refuses before re-executing anything (it used to print
    // "not stored" and exit 0, so a CI job against an empty store passed). (A store that
    // is not there at all is refused too, as a wrong path: see
    // `store_urls_and_missing_stores_are_usage_errors`.)
    std::fs::create_dir_all(sb.path().join("store")).unwrap();
    let r = sb.run(&["verify", "p.yaml"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("nothing stored to verify"),
        "{}",
        r.stderr
    );
    assert!(
        !sb.path().join("ran").exists(),
        "verify re-executed a stage"
    );
    assert_eq!(sb.run(&["run", "p.yaml"]).code, 0);
    assert_eq!(sb.read("ran"), "x\n");
    let r = sb.run(&["verify", "p.yaml", "--stage", "b"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("identical"), "{}", r.stdout);
    assert_eq!(sb.read("ran"), "x\n", "`other` was re-executed");
    let plan = sb.run(&["plan", "p.yaml", "--until", "b", "--force-all", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    let status: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        status,
        ["will_run", "blocked", "not_selected"],
        "{}",
        plan.stdout
    );
}

/// Where the store is, is a usage question: a URL that names no store is exit 2, so is a
/// store command run where there is no store (it would have created an empty one and
/// reported success on it), and an empty ORCHESTRATE_STORE means "unset".
#[test]
fn store_urls_and_missing_stores_are_usage_errors() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        "name: u\nstorage: file://store\nstages:\n  a: { kind: shell, with: { run: echo a > o, outputs: [o] } }\n",
    );
    for args in [&["fsck"][..], &["gc"], &["runs"]] {
        let r = sb.run(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("no store here"), "{}", r.stderr);
    }
    assert!(!sb.path().join("artifacts").exists());
    // Nor a store given by URL, or a pipeline's, that is not there: only `run` makes one.
    for args in [
        &["fsck", "--store", "file://typo"][..],
        &["gc", "--store", "file://typo"],
        &["runs", "--store", "file://typo"],
        &["show", "last", "--pipeline", "p.yaml"],
        &["verify", "p.yaml"],
    ] {
        let r = sb.run(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("only `run` creates one"),
            "{args:?}: {}",
            r.stderr
        );
    }
    assert!(!sb.path().join("typo").exists() && !sb.path().join("store").exists());
    for url in ["http://x", "s3://", "file://"] {
        let r = sb.run(&["run", "p.yaml", "--store", url]);
        assert_eq!(r.code, 2, "{url}: {}", r.stderr);
    }
    let r = sb
        .cmd(&["run", "p.yaml"])
        .env("ORCHESTRATE_STORE", "")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(sb.path().join("store/manifests").is_dir());
    sb.write(
        "bad.yaml",
        "name: u\nstorage: s3://\nstages:\n  a: { kind: shell, with: { run: 'true' } }\n",
    );
    let r = sb.run(&["validate", "bad.yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("bad.yaml:2:10") && r.stderr.contains("no bucket named"),
        "{}",
        r.stderr
    );
}
