//! The `shell` stage: user glue, and the way to exercise the engine without ML stages.
//!
//! The command runs under `sh -c` in the output directory, in its own process group so that
//! cancelling or timing out the stage stops everything it started. Inputs arrive as
//! environment variables (`INPUT_<NAME>` → the input artifact's directory), and only the
//! files listed in `outputs` become the artifact, so an undeclared scratch file never leaks
//! into the cache.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrate_stage::{
    canonical_params, ArtifactKind, Inputs, StageContext, StageDescriptor, StageError, StageOutput,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellParams {
    /// The command, run by `sh -c`.
    pub run: String,
    /// Files or directories, relative to `$OUT`, that make up the artifact.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

pub const DESCRIPTOR: StageDescriptor = StageDescriptor {
    kind: "shell",
    about: "runs a command; the files it declares become the artifact",
    inputs: Inputs::Any,
    output: ArtifactKind::Files,
    device_dependent: false,
    code_hash: env!("STAGE_CODE_HASH"),
    tracked_files: &[],
    canonical_params: canonical_params::<ShellParams>,
    file_deps: orchestrate_stage::no_file_deps,
    empty_part: orchestrate_stage::no_empty_parts,
};

/// How long a cancelled command gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// Lines of output kept for the error message of a failed command.
const TAIL_LINES: usize = 20;

pub fn run(ctx: &StageContext<'_>) -> Result<StageOutput, StageError> {
    let params: ShellParams = ctx.params()?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&params.run)
        .current_dir(ctx.out_dir)
        .env("OUT", ctx.out_dir)
        .env("SCRATCH", ctx.scratch_dir)
        .env("PIPELINE_DIR", ctx.pipeline_dir)
        .env("STAGE", ctx.stage)
        .envs(&params.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (name, artifacts) in ctx.inputs {
        let var = format!("INPUT_{}", env_name(name));
        let dirs: Vec<String> = artifacts
            .iter()
            .map(|a| a.dir.display().to_string())
            .collect();
        cmd.env(var, dirs.join(":"));
    }
    // SAFETY: runs in the forked child before `exec`, where only async-signal-safe calls
    // are allowed: prctl, and `guard_group`'s (see there). PDEATHSIG makes the kernel kill
    // `sh` if the orchestrator dies, even by SIGKILL; the guardian then takes down what `sh`
    // started, which PDEATHSIG alone would leave running.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            guard_group();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| StageError::io("failed to start `sh`", e))?;
    let pgid = child.id() as i32;

    let tail = Arc::new(Mutex::new(Vec::<String>::new()));
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|pipe| {
        let tail = Arc::clone(&tail);
        std::thread::spawn(move || forward_lines(pipe, &tail))
    })
    .collect();

    let mut lines_sent = 0;
    let mut term_sent: Option<std::time::Instant> = None;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| StageError::io("failed to wait for the command", e))?
        {
            break status;
        }
        lines_sent = flush_lines(ctx, &tail, lines_sent);
        if ctx.cancel.is_cancelled() {
            match term_sent {
                None => {
                    signal_group(pgid, libc::SIGTERM);
                    term_sent = Some(std::time::Instant::now());
                }
                Some(t) if t.elapsed() > TERM_GRACE => signal_group(pgid, libc::SIGKILL),
                Some(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    for r in readers {
        let _ = r.join();
    }
    flush_lines(ctx, &tail, lines_sent);
    if ctx.cancel.is_cancelled() {
        return Err(StageError::Cancelled);
    }
    if !status.success() {
        let tail = tail.lock().map(|t| t.clone()).unwrap_or_default();
        let start = tail.len().saturating_sub(TAIL_LINES);
        let mut msg = format!("command {status}");
        if start < tail.len() {
            msg.push_str("; its last output:\n");
            msg.push_str(&tail[start..].join("\n"));
        }
        return Err(StageError::Failed(msg));
    }
    keep_declared_outputs(ctx.out_dir, &params.outputs)?;
    let mut output = StageOutput::default();
    output
        .metadata
        .insert("command".into(), serde_json::Value::String(params.run));
    Ok(output)
}

/// `my-input.v2` → `MY_INPUT_V2`.
pub fn env_name(input: &str) -> String {
    input
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn forward_lines(pipe: Box<dyn Read + Send>, tail: &Mutex<Vec<String>>) {
    for line in BufReader::new(pipe).lines() {
        let Ok(line) = line else { break };
        if let Ok(mut t) = tail.lock() {
            t.push(line);
        }
    }
}

fn flush_lines(ctx: &StageContext<'_>, tail: &Mutex<Vec<String>>, sent: usize) -> usize {
    let Ok(t) = tail.lock() else { return sent };
    for line in &t[sent..] {
        ctx.events.log(line);
    }
    t.len()
}

/// Forks, from the child about to become `sh`, a guardian that sits in the command's process
/// group and kills the whole group when `sh` ends. Killed outright, the orchestrator can
/// signal nobody: the kernel kills `sh` (PDEATHSIG), but the processes `sh` started would
/// live on, writing into a working directory the next run reuses. The guardian outlives
/// `sh` by the kernel's notice (PDEATHSIG again, on `sh`), kills the group and exits. A
/// group-wide SIGTERM (a cancelled stage) ends the guardian quietly, leaving the grace
/// period to the orchestrator, which is alive to enforce it. If the fork fails there is
/// simply no guardian.
///
/// # Safety
/// Only between fork and exec: it calls fork, close_range, signal, prctl, getppid, pause,
/// kill and _exit, all async-signal-safe.
unsafe fn guard_group() {
    // SAFETY: the caller's contract; every call below is async-signal-safe.
    unsafe {
        let sh = libc::getpid();
        if libc::fork() != 0 {
            return; // `sh` goes on to exec; or the fork failed: no guardian
        }
        // No inherited descriptor may keep the command's pipes (or anything else) open.
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            for fd in 0..1024 {
                libc::close(fd);
            }
        }
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(
            libc::SIGUSR2,
            kill_own_group as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR2);
        // `sh` may have ended before the line above: then no signal will come.
        if libc::getppid() != sh {
            kill_own_group(0);
        }
        loop {
            libc::pause();
        }
    }
}

extern "C" fn kill_own_group(_: libc::c_int) {
    // SAFETY: kill(0, …) signals the caller's process group, the guardian's own included;
    // _exit covers the moment before the signal lands.
    unsafe {
        libc::kill(0, libc::SIGKILL);
        libc::_exit(0);
    }
}

fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group we created; no memory
    // is involved.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Checks that every declared output exists and removes everything else from `out`.
fn keep_declared_outputs(out: &Path, declared: &[String]) -> Result<(), StageError> {
    for rel in declared {
        if Path::new(rel).is_absolute() || rel.split('/').any(|p| p == "..") {
            return Err(StageError::Failed(format!(
                "output `{rel}` must be a relative path inside $OUT"
            )));
        }
        if !out.join(rel).exists() {
            return Err(StageError::Failed(format!(
                "the command succeeded but did not write its declared output `{rel}` (paths are relative to $OUT, the working directory)"
            )));
        }
    }
    let entries = std::fs::read_dir(out).map_err(|e| StageError::io("failed to list $OUT", e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let declared_here = declared
            .iter()
            .any(|d| d == &name || d.starts_with(&format!("{name}/")));
        if !declared_here {
            let path = entry.path();
            let res = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            res.map_err(|e| StageError::io(format!("failed to remove {}", path.display()), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrate_stage::{CancelToken, EventSink};

    struct Lines(Mutex<Vec<String>>);
    impl EventSink for Lines {
        fn progress(&self, _: u64, _: Option<u64>, _: &str) {}
        fn log(&self, line: &str) {
            self.0.lock().unwrap().push(line.to_string());
        }
        fn metric(&self, _: &str, _: f64, _: Option<u64>) {}
    }

    fn run_in(
        dir: &Path,
        params: serde_json::Value,
        cancel: &CancelToken,
    ) -> Result<StageOutput, StageError> {
        let out = dir.join("out");
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(&scratch).unwrap();
        let params = (DESCRIPTOR.canonical_params)(params).unwrap();
        let sink = Lines(Mutex::new(Vec::new()));
        let inputs = BTreeMap::new();
        let ctx = StageContext {
            stage: "s",
            params: &params,
            inputs: &inputs,
            out_dir: &out,
            scratch_dir: &scratch,
            pipeline_dir: dir,
            device: "cpu",
            events: &sink,
            cancel,
            checkpoints: &orchestrate_stage::NoCheckpoints,
        };
        run(&ctx)
    }

    fn tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("shell-stage-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn keeps_only_declared_outputs() {
        let d = tmp("keep");
        let p =
            serde_json::json!({"run": "echo a > a.txt; echo b > junk.txt", "outputs": ["a.txt"]});
        run_in(&d, p, &CancelToken::new()).unwrap();
        assert!(d.join("out/a.txt").exists());
        assert!(!d.join("out/junk.txt").exists());
    }

    #[test]
    fn failure_reports_status_and_output() {
        let d = tmp("fail");
        let p = serde_json::json!({"run": "echo boom >&2; exit 3"});
        let err = run_in(&d, p, &CancelToken::new()).unwrap_err().to_string();
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("boom"), "{err}");
    }

    #[test]
    fn missing_declared_output_is_an_error() {
        let d = tmp("missing");
        let p = serde_json::json!({"run": "true", "outputs": ["never.txt"]});
        let err = run_in(&d, p, &CancelToken::new()).unwrap_err().to_string();
        assert!(err.contains("`never.txt`"), "{err}");
    }

    #[test]
    fn cancel_stops_the_whole_process_group() {
        let d = tmp("cancel");
        let cancel = CancelToken::new();
        let c2 = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c2.cancel();
        });
        let start = std::time::Instant::now();
        let p = serde_json::json!({"run": "sleep 30 & sleep 30; wait"});
        let err = run_in(&d, p, &cancel).unwrap_err();
        assert!(matches!(err, StageError::Cancelled));
        assert!(start.elapsed() < Duration::from_secs(10));
    }
}
