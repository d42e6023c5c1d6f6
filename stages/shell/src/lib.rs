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
    canonical_params, ArtifactKind, Inputs, ParamError, ParamProblem, PathSegment, StageContext,
    StageDescriptor, StageError, StageOutput,
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
    names_in_output: true,
    code_hash: env!("STAGE_CODE_HASH"),
    tracked_files: &[],
    canonical_params: canonical,
    file_deps: orchestrate_stage::no_file_deps,
    empty_part: orchestrate_stage::no_empty_parts,
    unkeyed: &[],
};

/// The parameters with each output path in one spelling (`./a.txt` and `a.txt` are one
/// file, and one cache key), or the output that names no file inside `$OUT`.
fn canonical(v: serde_json::Value) -> Result<serde_json::Value, ParamError> {
    let v = canonical_params::<ShellParams>(v)?;
    let mut p: ShellParams = serde_json::from_value(v).expect("just canonicalised");
    let mut problems = Vec::new();
    let invalid = |path: Vec<PathSegment>, msg: String| ParamError {
        path,
        problem: ParamProblem::Invalid(msg),
    };
    if p.run.contains('\0') {
        problems.push(invalid(
            vec![PathSegment::Key("run".into())],
            "the command holds a NUL character, which no command line can".into(),
        ));
    }
    for (name, value) in &p.env {
        let at = vec![
            PathSegment::Key("env".into()),
            PathSegment::Key(name.clone()),
        ];
        if let Some(why) = env_problem(name, value) {
            problems.push(invalid(at, why));
        }
    }
    for (i, rel) in p.outputs.iter_mut().enumerate() {
        match normal_output(rel) {
            Ok(normal) => *rel = normal,
            Err(msg) => problems.push(ParamError {
                path: vec![PathSegment::Key("outputs".into()), PathSegment::Index(i)],
                problem: ParamProblem::Invalid(msg),
            }),
        }
    }
    match problems.len() {
        0 => {}
        1 => return Err(problems.remove(0)),
        _ => {
            return Err(ParamError {
                path: Vec::new(),
                problem: ParamProblem::Several(problems),
            })
        }
    }
    serde_json::to_value(p).map_err(|e| ParamError {
        path: Vec::new(),
        problem: ParamProblem::Invalid(e.to_string()),
    })
}

/// The variables the stage sets for every command (and `INPUT_<NAME>` per input), in the
/// order `run` gives their values.
const OWN_VARIABLES: [&str; 4] = ["OUT", "SCRATCH", "PIPELINE_DIR", "STAGE"];

/// What makes `name=value` no variable the command may be given, if anything: the names
/// the stage sets itself (`$OUT` is its working directory: another value would send its
/// files elsewhere), and what an environment cannot hold.
fn env_problem(name: &str, value: &str) -> Option<String> {
    if OWN_VARIABLES.contains(&name) || name.starts_with("INPUT_") {
        return Some(format!(
            "`{name}` is set by the stage itself (OUT, SCRATCH, PIPELINE_DIR, STAGE, INPUT_*): use another name"
        ));
    }
    if name.is_empty() || name.contains(['=', '\0']) {
        return Some(format!(
            "`{name}` is no variable name: names are not empty and hold no `=` or NUL"
        ));
    }
    value
        .contains('\0')
        .then(|| format!("the value of `{name}` holds a NUL character, which no environment can"))
}

/// `./d//a.txt` → `d/a.txt`; an error for a path that leaves `$OUT` or is all of it.
fn normal_output(rel: &str) -> Result<String, String> {
    if rel.starts_with('/') {
        return Err(format!(
            "output `{rel}` must be a relative path inside $OUT"
        ));
    }
    let parts: Vec<&str> = rel
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(format!(
            "output `{rel}` must be a relative path inside $OUT"
        ));
    }
    if parts.is_empty() {
        return Err(format!(
            "output `{rel}` names no file: list the files or folders inside $OUT that make up the artifact"
        ));
    }
    Ok(parts.join("/"))
}

/// How long a cancelled command gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// Lines of output kept for the error message of a failed command.
const TAIL_LINES: usize = 20;
/// How long the output is read after the command's group is gone (see `run`).
const DRAIN: Duration = Duration::from_secs(2);
/// Bytes read and not yet logged, at most (beyond one line): a reader waits while there
/// are more, so the command's pipe fills and a command printing faster than the log takes
/// slows down rather than fill the orchestrator's memory (10 million lines took 780 MB).
const MAX_PENDING_BYTES: usize = 8 << 20;

/// The shell the command runs under: it runs the command (`$1`) as a job and waits for it.
/// Killed outright, the orchestrator can signal nobody, and the kernel's notice of its death
/// (PDEATHSIG) reaches only its own child: this shell, as SIGUSR2, on which it kills its
/// whole process group, so nothing the command started lives on, writing into a working
/// directory the next run reuses. A cancelled stage's SIGTERM reaches the whole group; this
/// shell notes it (a caught signal interrupts `wait`) and waits again while the job runs, so
/// the orchestrator's grace period, then SIGKILL, hold. The job must run in the background
/// (a shell defers traps until a foreground command ends), and a shell starts background
/// jobs with SIGINT and SIGQUIT ignored: `env --default-signal` (coreutils 8.31 and later)
/// gives the command the default ones back.
const WRAPPER: &str = r#"trap 'kill -KILL 0' USR2
trap 'term=1' TERM
term=
if env --default-signal=INT,QUIT true 2>/dev/null; then
    env --default-signal=INT,QUIT sh -c "$1" &
else
    sh -c "$1" &
fi
job=$!
while :; do
    wait "$job"
    status=$?
    if [ -n "$term" ] && kill -0 "$job" 2>/dev/null; then
        term=
        continue
    fi
    exit "$status"
done"#;

/// Kills the command's process group when dropped: whatever way `run` leaves (an error, a
/// panic), nothing it started is left running.
struct GroupGuard(i32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        signal_group(self.0, libc::SIGKILL);
    }
}

pub fn run(ctx: &StageContext<'_>) -> Result<StageOutput, StageError> {
    let params: ShellParams = ctx.params()?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(WRAPPER)
        .arg("orchestrate-shell")
        .arg(&params.run)
        .current_dir(ctx.out_dir)
        .envs(OWN_VARIABLES.into_iter().zip([
            ctx.out_dir.as_os_str(),
            ctx.scratch_dir.as_os_str(),
            ctx.pipeline_dir.as_os_str(),
            std::ffi::OsStr::new(ctx.stage),
        ]))
        // Python would write `__pycache__` beside a module it imports from an input (a
        // tool a stage built), and a stage may not write into its inputs. (`env` may set
        // it back.)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .envs(&params.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // An `INPUT_*` the orchestrator inherited (a stage running `orchestrate run` itself)
    // would name another stage's folders, outside this stage's key: only its own are set.
    for (var, _) in std::env::vars_os() {
        if var.as_encoded_bytes().starts_with(b"INPUT_") {
            cmd.env_remove(var);
        }
    }
    for (name, artifacts) in ctx.inputs {
        let var = format!("INPUT_{}", env_name(name));
        // As bytes: a folder whose name is not UTF-8 (where the pipeline lies) is passed
        // as it is, not with U+FFFD in its place, which names no folder.
        let dirs: Vec<&std::ffi::OsStr> = artifacts.iter().map(|a| a.dir.as_os_str()).collect();
        cmd.env(var, dirs.join(std::ffi::OsStr::new(":")));
    }
    let orchestrator = std::process::id();
    // SAFETY: runs in the forked child before `exec`, where only async-signal-safe calls
    // are allowed: setsid, sigaction, prctl, getppid and _exit are. The kernel sends SIGUSR2 to the
    // wrapper shell when the orchestrator's thread dies, even by SIGKILL (see `WRAPPER`);
    // before the shell has set its trap, SIGUSR2 simply ends it, having started nothing.
    // Signals the orchestrator was started with ignored (`nohup`) would stay ignored, and a
    // shell cannot trap those: they get their default action back first.
    unsafe {
        cmd.pre_exec(move || {
            // A session of its own, so a group of its own (signalled as one) and no
            // controlling terminal: a command that asks at the terminal (sudo, ssh, git's
            // credential prompt) fails at once, where in the terminal's session it would be
            // stopped by SIGTTIN, and the stage would wait for ever.
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            for sig in [libc::SIGUSR2, libc::SIGTERM, libc::SIGINT, libc::SIGQUIT] {
                libc::sigaction(sig, &default, std::ptr::null_mut());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR2);
            // Died between the fork and the line above: no signal will come.
            if libc::getppid() as u32 != orchestrator {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| StageError::io("failed to start `sh`", e))?;
    let pgid = child.id() as i32;
    let group = GroupGuard(pgid);

    let tail = Arc::new(Mutex::new(Captured::default()));
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
    .collect::<Vec<_>>();
    let _detach = Detach(Arc::clone(&tail));

    let mut term_sent: Option<std::time::Instant> = None;
    loop {
        if wrapper_exited(pgid).map_err(|e| StageError::io("failed to wait for the command", e))? {
            break;
        }
        flush_lines(ctx, &tail);
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
    }
    // Whatever the command left running in the background ends with it: it would otherwise
    // hold the output pipes open (and the readers below would wait for it), and go on
    // writing after the stage is done. The wrapper is not reaped yet, so its process group
    // id cannot have been reused.
    signal_group(pgid, libc::SIGKILL);
    // Done with the group: once the wrapper is reaped its id may be another process's.
    std::mem::forget(group);
    let status = child
        .wait()
        .map_err(|e| StageError::io("failed to wait for the command", e))?;
    // The pipes end once nothing holds them. A process that left the group (`setsid`, a
    // daemon) may hold them for good: its output is not waited for beyond a moment.
    let drain_until = std::time::Instant::now() + DRAIN;
    while readers.iter().any(|r| !r.is_finished()) && !ctx.cancel.is_cancelled() {
        flush_lines(ctx, &tail);
        if std::time::Instant::now() > drain_until {
            ctx.events.log(
                "(output cut off here: a process the command started outside its process group, with setsid, still holds it)",
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    flush_lines(ctx, &tail);
    // Stopped by the signal sent above, whatever it exited with (a handler may exit 0 with
    // its work half done). A command that ended by itself, Ctrl-C or not, finished.
    if term_sent.is_some() {
        return Err(StageError::Cancelled);
    }
    if !status.success() {
        let tail: Vec<String> = tail
            .lock()
            .map(|t| t.last.iter().cloned().collect())
            .unwrap_or_default();
        // The wrapper exits as its job did: 128 + N for a job killed by signal N.
        let mut msg = match status.code() {
            // (Or the command's own `exit 130`: the two cannot be told apart.)
            Some(code @ 129..=192) => format!(
                "command exited with status {code}: killed by signal {} (or its own `exit {code}`)",
                code - 128
            ),
            _ => format!("command {status}"),
        };
        if !tail.is_empty() {
            msg.push_str("; its last output:\n");
            let shown: Vec<&str> = tail.iter().map(|l| shortened(l)).collect();
            msg.push_str(&shown.join("\n"));
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

/// What the command printed: lines not yet logged (about [`MAX_PENDING_BYTES`] at most:
/// readers wait for the log), and the last few for an error message.
#[derive(Default)]
struct Captured {
    pending: Vec<String>,
    pending_bytes: usize,
    last: std::collections::VecDeque<String>,
    /// Nothing logs any more (the stage is done with the command's output): lines are no
    /// longer kept for the log, and no reader waits for it. A reader left to a process
    /// that escaped the group (`setsid`) goes on reading, so that process never blocks on
    /// a full pipe.
    detached: bool,
}

impl Captured {
    fn push(&mut self, line: String) {
        if self.last.len() == TAIL_LINES {
            self.last.pop_front();
        }
        self.last.push_back(line.clone());
        if !self.detached {
            self.pending_bytes += line.len();
            self.pending.push(line);
        }
    }

    /// Whether a reader must wait for the log before adding a line.
    fn full(&self) -> bool {
        !self.detached && self.pending_bytes >= MAX_PENDING_BYTES
    }

    fn take_pending(&mut self) -> Vec<String> {
        self.pending_bytes = 0;
        std::mem::take(&mut self.pending)
    }
}

/// Detaches the readers from the log (see [`Captured::detached`]) however `run` leaves.
struct Detach(Arc<Mutex<Captured>>);

impl Drop for Detach {
    fn drop(&mut self) {
        if let Ok(mut c) = self.0.lock() {
            c.detached = true;
        }
    }
}

/// A line longer than this is passed on in pieces (a progress bar without newlines, binary
/// output), so that memory stays bounded.
const MAX_LINE: usize = 64 * 1024;

/// Reads the pipe to its end, line by line. Bytes that are not UTF-8 (Latin-1 text, binary)
/// are shown with replacement characters: stopping at them would leave the pipe unread and
/// the command killed by SIGPIPE at its next write.
fn forward_lines(pipe: Box<dyn Read + Send>, captured: &Mutex<Captured>) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    let emit = |line: &mut Vec<u8>| {
        if line.ends_with(b"\r") {
            line.pop();
        }
        let text = String::from_utf8_lossy(line).into_owned();
        line.clear();
        // Waits for the log to take what is pending (see MAX_PENDING_BYTES).
        while captured.lock().is_ok_and(|c| c.full()) {
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Ok(mut c) = captured.lock() {
            c.push(text);
        }
    };
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if buf.is_empty() {
            if !line.is_empty() {
                emit(&mut line);
            }
            break;
        }
        let room = MAX_LINE - line.len();
        let (used, ended) = match buf.iter().take(room + 1).position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..i]);
                (i + 1, true)
            }
            None => {
                let n = buf.len().min(room);
                line.extend_from_slice(&buf[..n]);
                (n, line.len() == MAX_LINE)
            }
        };
        reader.consume(used);
        if ended {
            emit(&mut line);
        }
    }
}

/// A line as a failure's message quotes it: at most about 1 KiB (a progress bar without
/// newlines would otherwise fill the run record), cut at a character boundary.
fn shortened(line: &str) -> &str {
    const MAX: usize = 1024;
    if line.len() <= MAX {
        return line;
    }
    let mut end = MAX;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

fn flush_lines(ctx: &StageContext<'_>, captured: &Mutex<Captured>) {
    let pending = match captured.lock() {
        Ok(mut c) => c.take_pending(),
        Err(_) => return,
    };
    for line in &pending {
        ctx.events.log(line);
    }
}

/// Whether the wrapper shell `pid` has exited, leaving it unreaped (`WNOWAIT`).
fn wrapper_exited(pid: i32) -> std::io::Result<bool> {
    // SAFETY: waitid fills the zeroed siginfo it is given; WNOWAIT leaves the child to be
    // reaped by `Child::wait`.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(info.si_pid() != 0)
    }
}

fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group we created; no memory
    // is involved.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Checks that every declared output exists and removes everything else from `out`, at
/// every depth: with `outputs: [d/a]`, a `d/junk` beside it is not part of the artifact.
fn keep_declared_outputs(out: &Path, declared: &[String]) -> Result<(), StageError> {
    for rel in declared {
        let path = out.join(rel);
        let exists = path.exists();
        if !exists && path.symlink_metadata().is_ok() {
            return Err(StageError::Failed(format!(
                "declared output `{rel}` is a link to nothing ({}): an artifact holds files, so link to one, or write it there",
                std::fs::read_link(&path)
                    .map(|t| format!("it points to {}", t.display()))
                    .unwrap_or_else(|_| "its target cannot be read".into())
            )));
        }
        if !exists {
            return Err(StageError::Failed(format!(
                "the command succeeded but did not write its declared output `{rel}` (paths are relative to $OUT, the working directory)"
            )));
        }
        // The artifact holds files: a folder with none would be stored as nothing at all, and
        // the stage below would not find it.
        if path.is_dir() && !holds_a_file(&path) {
            return Err(StageError::Failed(format!(
                "declared output `{rel}` is a folder with no files in it, which an artifact cannot hold (it stores files): write a file into it"
            )));
        }
        // The artifact holds files, and folders are walked without following links: an
        // output that is, or lies behind, a link to a folder would store nothing.
        let mut at = out.to_path_buf();
        for part in rel.split('/') {
            at.push(part);
            let linked_folder = at.symlink_metadata().is_ok_and(|m| m.is_symlink()) && at.is_dir();
            if linked_folder {
                return Err(StageError::Failed(format!(
                    "declared output `{rel}` is reached through `{}`, a symbolic link to a folder: copy the files into $OUT instead",
                    at.strip_prefix(out).unwrap_or(&at).display()
                )));
            }
        }
    }
    prune(out, "", declared)
}

/// Whether `dir` holds a file (or a link to one) at any depth.
fn holds_a_file(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => holds_a_file(&path),
            Ok(_) => !path.is_dir(),
            Err(_) => false,
        }
    })
}

/// Removes what `dir` (at `prefix` inside `$OUT`) holds beyond the declared outputs and the
/// folders on their way.
fn prune(dir: &Path, prefix: &str, declared: &[String]) -> Result<(), StageError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| StageError::io(format!("failed to list {}", dir.display()), e))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| StageError::io(format!("failed to list {}", dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if declared.contains(&rel) {
            continue;
        }
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let on_the_way = declared.iter().any(|d| d.starts_with(&format!("{rel}/")));
        if on_the_way {
            // A link on the way to an output is kept as it is: pruning through it would
            // delete files outside $OUT.
            if is_dir {
                prune(&path, &rel, declared)?;
            }
            continue;
        }
        let res = if is_dir {
            orchestrate_stage::remove_tree(&path)
        } else {
            std::fs::remove_file(&path)
        };
        res.map_err(|e| StageError::io(format!("failed to remove {}", path.display()), e))?;
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
    fn keeps_declared_outputs_at_every_depth_in_any_spelling() {
        let d = tmp("nested");
        let p = serde_json::json!({
            "run": "mkdir -p d/e; echo a > d/a; echo j > d/junk; echo k > d/e/k; echo t > top.txt; echo x > x",
            "outputs": ["d/a", "./top.txt", "d//e/"],
        });
        run_in(&d, p, &CancelToken::new()).unwrap();
        for kept in ["d/a", "top.txt", "d/e/k"] {
            assert!(d.join("out").join(kept).exists(), "{kept}");
        }
        for gone in ["d/junk", "x"] {
            assert!(!d.join("out").join(gone).exists(), "{gone}");
        }
    }

    #[test]
    fn outputs_are_spelt_one_way_and_stay_inside_out() {
        let canonical = |outputs: serde_json::Value| {
            (DESCRIPTOR.canonical_params)(serde_json::json!({"run": "x", "outputs": outputs}))
        };
        let v = canonical(serde_json::json!(["./a//b/", "c"])).unwrap();
        assert_eq!(v["outputs"], serde_json::json!(["a/b", "c"]));
        for bad in [".", "./", "", "../x", "a/../../x", "/etc/passwd"] {
            let e = canonical(serde_json::json!(["ok", bad])).unwrap_err();
            assert_eq!(
                e.path,
                [PathSegment::Key("outputs".into()), PathSegment::Index(1)],
                "{bad}"
            );
        }
    }

    #[test]
    fn every_bad_output_is_named_and_links_to_folders_are_refused() {
        let e = (DESCRIPTOR.canonical_params)(
            serde_json::json!({"run": "x", "outputs": [".", "a", "../b"]}),
        )
        .unwrap_err();
        let ParamProblem::Several(all) = e.problem else {
            panic!("{e}")
        };
        let at: Vec<_> = all.iter().map(|e| e.path[1].clone()).collect();
        assert_eq!(at, [PathSegment::Index(0), PathSegment::Index(2)]);

        let d = tmp("link");
        let p = serde_json::json!({
            "run": "mkdir -p $SCRATCH/ext; echo a > $SCRATCH/ext/a; ln -s $SCRATCH/ext d",
            "outputs": ["d/a"],
        });
        let err = run_in(&d, p, &CancelToken::new()).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn output_that_is_not_utf8_is_read_to_its_end() {
        let d = tmp("latin1");
        // Enough lines after the Latin-1 one to fill the pipe, had the reader stopped.
        let p = serde_json::json!({
            "run": "printf 'caf\\351\\n'; i=0; while [ $i -lt 5000 ]; do echo line $i; i=$((i+1)); done; echo done > o",
            "outputs": ["o"],
        });
        run_in(&d, p, &CancelToken::new()).unwrap();
        assert!(d.join("out/o").exists());
    }

    #[test]
    fn a_failure_shows_the_last_lines_only() {
        let d = tmp("tail");
        let p = serde_json::json!({"run": "i=0; while [ $i -lt 100 ]; do echo l$i; i=$((i+1)); done; exit 1"});
        let err = run_in(&d, p, &CancelToken::new()).unwrap_err().to_string();
        assert!(err.contains("\nl80\n") && err.ends_with("l99"), "{err}");
        assert!(!err.contains("l79"), "{err}");
    }

    #[test]
    fn failure_reports_status_and_output() {
        let d = tmp("fail");
        let p = serde_json::json!({"run": "echo boom >&2; exit 3"});
        let err = run_in(&d, p, &CancelToken::new()).unwrap_err().to_string();
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("boom"), "{err}");
    }

    /// A status above 128 is a signal's or the command's own: the message gives both.
    #[test]
    fn a_status_above_128_names_the_signal_and_the_exit() {
        let d = tmp("exit130");
        let p = serde_json::json!({"run": "exit 130"});
        let err = run_in(&d, p, &CancelToken::new()).unwrap_err().to_string();
        assert!(
            err.contains(
                "command exited with status 130: killed by signal 2 (or its own `exit 130`)"
            ),
            "{err}"
        );
    }

    /// The command runs in a session of its own, with no controlling terminal to stop it.
    #[test]
    fn the_command_runs_in_a_session_of_its_own() {
        let d = tmp("session");
        let p = serde_json::json!({"run": "awk '{print $6}' /proc/self/stat > sid", "outputs": ["sid"]});
        run_in(&d, p, &CancelToken::new()).unwrap();
        let sid: i32 = std::fs::read_to_string(d.join("out/sid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: getsid(0) reads this process's session id; no memory is involved.
        let ours = unsafe { libc::getsid(0) };
        assert_ne!(sid, ours);
    }

    #[test]
    fn a_declared_output_linking_to_nothing_is_named() {
        let d = tmp("dangling");
        let p = serde_json::json!({"run": "ln -s gone o", "outputs": ["o"]});
        let err = run_in(&d, p, &CancelToken::new()).unwrap_err().to_string();
        assert!(
            err.contains("declared output `o` is a link to nothing (it points to gone)"),
            "{err}"
        );
    }

    #[test]
    fn missing_declared_output_is_an_error() {
        let d = tmp("missing");
        let p = serde_json::json!({"run": "true", "outputs": ["never.txt"]});
        let err = run_in(&d, p, &CancelToken::new()).unwrap_err().to_string();
        assert!(err.contains("`never.txt`"), "{err}");
    }

    /// A process that leaves the command's group (`setsid`) and keeps its output open does
    /// not hold the stage: its output is read for a moment, then cut off, said so.
    #[test]
    fn a_process_that_left_the_group_does_not_hold_the_stage() {
        let d = tmp("setsid");
        let p = serde_json::json!({"run": "setsid sleep 30 & echo started; echo x > o", "outputs": ["o"]});
        let start = std::time::Instant::now();
        run_in(&d, p, &CancelToken::new()).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        assert!(d.join("out/o").exists());
    }

    /// A command printing faster than the log takes its lines is slowed down, not buffered
    /// without bound: every line still arrives, and about MAX_PENDING_BYTES wait at most.
    #[test]
    fn output_is_read_no_faster_than_it_is_logged() {
        let captured = Arc::new(Mutex::new(Captured::default()));
        let line = "x".repeat(1023);
        let n = 3 * MAX_PENDING_BYTES / 1024;
        let text: String = (0..n).map(|_| format!("{line}\n")).collect();
        let reader = {
            let captured = Arc::clone(&captured);
            std::thread::spawn(move || {
                forward_lines(Box::new(std::io::Cursor::new(text.into_bytes())), &captured)
            })
        };
        let mut logged = 0;
        while logged < n {
            let pending = captured.lock().unwrap().take_pending();
            let bytes: usize = pending.iter().map(String::len).sum();
            assert!(bytes <= MAX_PENDING_BYTES + 1024, "{bytes}");
            logged += pending.len();
            std::thread::sleep(Duration::from_millis(5));
        }
        reader.join().unwrap();
        assert_eq!(logged, n);
        // Detached, nothing waits or is kept for the log: a reader reads on to the end.
        captured.lock().unwrap().detached = true;
        let text: String = (0..n).map(|_| format!("{line}\n")).collect();
        forward_lines(Box::new(std::io::Cursor::new(text.into_bytes())), &captured);
        assert!(captured.lock().unwrap().pending.is_empty());
    }

    /// What the stage sets itself, and what no environment can hold, is refused by name;
    /// so are outputs an artifact cannot hold.
    #[test]
    fn reserved_or_impossible_variables_and_empty_folders_are_refused() {
        for (env, says) in [
            (
                serde_json::json!({"OUT": "/tmp"}),
                "set by the stage itself",
            ),
            (
                serde_json::json!({"INPUT_A": "x"}),
                "set by the stage itself",
            ),
            (serde_json::json!({"A=B": "c"}), "no variable name"),
            (serde_json::json!({"A": "x\0y"}), "holds a NUL"),
        ] {
            let e = (DESCRIPTOR.canonical_params)(serde_json::json!({"run": "true", "env": env}))
                .unwrap_err();
            assert!(format!("{e:?}").contains(says), "{e:?}");
        }
        let d = tmp("empty-folder");
        let p = serde_json::json!({"run": "mkdir -p e/sub", "outputs": ["e"]});
        let err = run_in(&d, p, &CancelToken::new()).unwrap_err().to_string();
        assert!(err.contains("`e` is a folder with no files"), "{err}");
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
        // The background job's pid, written whole (renamed into place) for the test.
        let p = serde_json::json!({"run": "sleep 30 & echo $! > $PIPELINE_DIR/bg.tmp; mv $PIPELINE_DIR/bg.tmp $PIPELINE_DIR/bg; sleep 30; wait"});
        let err = run_in(&d, p, &cancel).unwrap_err();
        assert!(matches!(err, StageError::Cancelled));
        assert!(start.elapsed() < Duration::from_secs(10));
        // The background job went with the group: gone, or a zombie nobody reaped yet.
        let pid = std::fs::read_to_string(d.join("bg")).expect("the job started");
        let alive = || {
            std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
                .is_ok_and(|s| !s.contains(") Z "))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !alive(),
            "the background `sleep 30` outlived the cancelled stage"
        );
    }
}
