//! The contract between the orchestrator and its stages.
//!
//! A stage crate exports a [`StageDescriptor`] (what it consumes and produces, its parameter
//! validation, the hash of its own code) and a `run` function that does the work inside a
//! [`StageContext`]. The orchestrator owns everything else: caching, storage, locking,
//! scheduling, progress display. This crate must stay free of heavy dependencies: the
//! orchestrator core links it, and the core builds in seconds.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The type of a stage's output, checked on every edge of the pipeline graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ArtifactKind {
    Corpus,
    Tokenizer,
    Model,
    EvalReport,
    Deployment,
    /// Untyped files, produced by `shell` stages.
    Files,
}

impl ArtifactKind {
    pub const ALL: [ArtifactKind; 6] = [
        ArtifactKind::Corpus,
        ArtifactKind::Tokenizer,
        ArtifactKind::Model,
        ArtifactKind::EvalReport,
        ArtifactKind::Deployment,
        ArtifactKind::Files,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Corpus => "Corpus",
            ArtifactKind::Tokenizer => "Tokenizer",
            ArtifactKind::Model => "Model",
            ArtifactKind::EvalReport => "EvalReport",
            ArtifactKind::Deployment => "Deployment",
            ArtifactKind::Files => "Files",
        }
    }
}

impl fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ArtifactKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ArtifactKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown artifact kind `{s}`"))
    }
}

/// One named input a stage kind accepts.
#[derive(Clone, Copy, Debug)]
pub struct InputDecl {
    pub name: &'static str,
    pub kind: ArtifactKind,
    /// Whether the input takes a list of stages (`models: [model, int8]`).
    pub many: bool,
    pub required: bool,
    /// The parts of the input artifact the stage cannot do without (a Corpus's splits:
    /// `"val"`, `"test"`). A producer whose params leave one of them empty is refused when
    /// the pipeline is validated, not after the hours of work before the consumer runs.
    pub reads: &'static [&'static str],
}

/// Which inputs a stage kind accepts.
#[derive(Clone, Copy, Debug)]
pub enum Inputs {
    /// Exactly these names, each of a fixed artifact kind.
    Typed(&'static [InputDecl]),
    /// Any names, any kinds: glue stages such as `shell`.
    Any,
}

/// Why a stage's `with:` block was rejected, with the path to the offending value.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamError {
    /// Keys and indices from the `with:` block down to the value at fault.
    pub path: Vec<PathSegment>,
    pub problem: ParamProblem,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PathSegment {
    Key(String),
    Index(usize),
}

#[derive(Clone, Debug, PartialEq)]
pub enum ParamProblem {
    UnknownKey {
        key: String,
        expected: Vec<String>,
    },
    MissingKey {
        key: String,
    },
    /// A value of the wrong type or out of range; the message is serde's or the stage's own.
    Invalid(String),
    /// More than one key of the block is at fault: each problem, in the block's key order.
    Several(Vec<ParamError>),
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            ParamProblem::UnknownKey { key, .. } => write!(f, "unknown key `{key}`"),
            ParamProblem::MissingKey { key } => write!(f, "missing required key `{key}`"),
            ParamProblem::Invalid(msg) => f.write_str(msg),
            ParamProblem::Several(all) => {
                let shown: Vec<String> = all.iter().map(ToString::to_string).collect();
                f.write_str(&shown.join("; "))
            }
        }
    }
}

/// The files a stage reads (see [`StageDescriptor::file_deps`]), or a problem per param
/// that names none.
pub type FileDeps = Result<Vec<String>, Vec<ParamError>>;

/// Everything the orchestrator needs to know about a stage kind without running it.
#[derive(Clone, Copy)]
pub struct StageDescriptor {
    /// The name used in YAML `kind:`.
    pub kind: &'static str,
    pub about: &'static str,
    pub inputs: Inputs,
    pub output: ArtifactKind,
    /// Whether results differ between CPU and GPU, so the device class joins the cache key.
    pub device_dependent: bool,
    /// Whether stage names reach the output (a shell command's `$STAGE`, a report naming its
    /// models by stage), so the stage's and its producers' names join the cache key.
    pub names_in_output: bool,
    /// Hash of the stage crate's source, computed at build time (see `orchestrate-codehash`).
    pub code_hash: &'static str,
    /// Checks a `with:` block and returns it canonical: defaults filled in, unknown keys rejected.
    pub canonical_params: fn(serde_json::Value) -> Result<serde_json::Value, ParamError>,
    /// Output files worth uploading to the tracking server (small, human-readable).
    pub tracked_files: &'static [&'static str],
    /// Local files the stage reads, named by its params (relative paths against the given
    /// pipeline directory); their contents join the cache key. Each param naming nothing that
    /// exists is an error at that param, so `validate` reports them before anything runs.
    pub file_deps: fn(&serde_json::Value, &Path) -> FileDeps,
    /// Given canonical params and a part of the output (see [`InputDecl::reads`]): the
    /// param that leaves that part empty, if these params do.
    pub empty_part: fn(&serde_json::Value, &str) -> Option<Vec<PathSegment>>,
    /// Top-level params that change how the work is done but not one byte of the output
    /// (a thread count, how often to checkpoint): left out of the cache key, so changing
    /// one neither redoes the work nor loses the checkpoints stored under the key.
    pub unkeyed: &'static [&'static str],
}

impl fmt::Debug for StageDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StageDescriptor")
            .field("kind", &self.kind)
            .finish()
    }
}

/// Removes the folder `dir` and all it holds, as `remove_dir_all`, and also where a command
/// left a folder inside it read-only (Go's module cache is): such a folder's entries cannot
/// be removed until it is made writable again, which is done for the folders under `dir`
/// only (links are not followed).
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            make_folders_writable(dir);
            std::fs::remove_dir_all(dir)
        }
        other => other,
    }
}

fn make_folders_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o700));
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            make_folders_writable(&entry.path());
        }
    }
}

/// For stages whose params never leave a part of their output empty.
pub fn no_empty_parts(_: &serde_json::Value, _: &str) -> Option<Vec<PathSegment>> {
    None
}

/// For stages that read no files beyond their inputs.
pub fn no_file_deps(_: &serde_json::Value, _: &Path) -> FileDeps {
    Ok(Vec::new())
}

/// Validates `with:` against a parameter struct `P` and returns it canonical. `P` should use
/// `#[serde(deny_unknown_fields)]` and `#[serde(default)]` so that every key is checked and
/// every default is written out (defaults are part of the cache key).
pub fn canonical_params<P: DeserializeOwned + Serialize>(
    value: serde_json::Value,
) -> Result<serde_json::Value, ParamError> {
    let parsed: P = match parse_params::<P>(value.clone()) {
        Ok(parsed) => parsed,
        Err(first) => return Err(every_problem::<P>(&value, first)),
    };
    serde_json::to_value(parsed).map_err(|e| ParamError {
        path: Vec::new(),
        problem: ParamProblem::Invalid(e.to_string()),
    })
}

/// A stage's parameter problems as `canonical_params` reports them: none, the one, or
/// every one at once (`validate` shows them all, each at its key).
pub fn param_problems(mut problems: Vec<ParamError>) -> Result<(), ParamError> {
    match problems.len() {
        0 => Ok(()),
        1 => Err(problems.remove(0)),
        _ => Err(ParamError {
            path: Vec::new(),
            problem: ParamProblem::Several(problems),
        }),
    }
}

/// serde reports unknown and missing fields only as text; recover their structure so the
/// orchestrator can point at the key and suggest the nearest known one.
fn classify_serde_message(msg: &str) -> ParamProblem {
    let ticked = |s: &str| -> Vec<String> {
        s.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let mut names = ticked(rest);
        if !names.is_empty() {
            let key = names.remove(0);
            return ParamProblem::UnknownKey {
                key,
                expected: names,
            };
        }
    }
    if let Some(rest) = msg.strip_prefix("missing field ") {
        if let Some(key) = ticked(rest).into_iter().next() {
            return ParamProblem::MissingKey { key };
        }
    }
    // serde_json appends " at line 0 column 0" when deserializing from a Value; it means nothing.
    let clean = msg.trim_end_matches(" at line 0 column 0");
    ParamProblem::Invalid(in_words(clean))
}

/// serde's names of Rust types, in a YAML writer's words: `expected u16` says little to
/// someone who wrote `port: 99999`.
fn in_words(msg: &str) -> String {
    let words = [
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a whole number of at least 0"),
        ("expected usize", "expected a whole number of at least 0"),
        ("expected i64", "expected a whole number"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
    ];
    let mut out = msg.to_string();
    for (rust, plain) in words {
        // Whole words only: `expected u64` is not the start of `expected u64s`.
        if let Some(at) = out.find(rust) {
            let end = at + rust.len();
            if !out[end..].starts_with(|c: char| c.is_alphanumeric()) {
                out.replace_range(at..end, plain);
            }
        }
    }
    out
}

fn parse_params<P: DeserializeOwned>(value: serde_json::Value) -> Result<P, ParamError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err
            .path()
            .iter()
            .filter_map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => Some(PathSegment::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(PathSegment::Index(*index)),
                _ => None,
            })
            .collect();
        ParamError {
            path,
            problem: classify_serde_message(&err.inner().to_string()),
        }
    })
}

/// serde stops at a block's first problem; `validate` promises every one. Each key is
/// checked again on its own (the others left to their defaults), and the problems found
/// inside that key are kept: one per key at fault, in the block's order.
fn every_problem<P: DeserializeOwned>(value: &serde_json::Value, first: ParamError) -> ParamError {
    let serde_json::Value::Object(block) = value else {
        return first;
    };
    let at_key = |e: &ParamError, key: &str| match (&e.problem, e.path.first()) {
        (ParamProblem::UnknownKey { key: k, .. }, None) => k == key,
        (_, Some(PathSegment::Key(k))) => k == key,
        _ => false,
    };
    let mut all: Vec<ParamError> = Vec::new();
    for (key, v) in block {
        let alone = serde_json::Value::Object([(key.clone(), v.clone())].into_iter().collect());
        if let Err(e) = parse_params::<P>(alone) {
            if at_key(&e, key) {
                all.push(e);
            }
        }
    }
    // What is left without the keys at fault: a required key missing, say.
    let rest: serde_json::Map<String, serde_json::Value> = block
        .iter()
        .filter(|(k, _)| !all.iter().any(|e| at_key(e, k)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Err(e) = parse_params::<P>(serde_json::Value::Object(rest)) {
        // "Missing" only because it was taken out, being at fault already: not a problem.
        let taken_out =
            matches!(&e.problem, ParamProblem::MissingKey { key } if block.contains_key(key));
        if !taken_out && !all.contains(&e) {
            all.push(e);
        }
    }
    // The first problem found is reported whatever (one that only shows with its siblings).
    if !all.contains(&first) {
        all.insert(0, first);
    }
    match all.len() {
        1 => all.remove(0),
        _ => ParamError {
            path: Vec::new(),
            problem: ParamProblem::Several(all),
        },
    }
}

/// Cooperative cancellation. A token is cancelled when any of its ancestors is, so Ctrl-C
/// (the root) and a stage's timeout (a child) reach the same place in the stage's code.
#[derive(Clone, Debug, Default)]
pub struct CancelToken {
    flags: Vec<Arc<AtomicBool>>,
}

impl CancelToken {
    pub fn new() -> Self {
        CancelToken {
            flags: vec![Arc::new(AtomicBool::new(false))],
        }
    }

    pub fn child(&self) -> Self {
        let mut flags = self.flags.clone();
        flags.push(Arc::new(AtomicBool::new(false)));
        CancelToken { flags }
    }

    /// Cancels this token and its children, not its parents.
    pub fn cancel(&self) {
        if let Some(own) = self.flags.last() {
            own.store(true, Ordering::SeqCst);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.flags.iter().any(|f| f.load(Ordering::SeqCst))
    }
}

/// Where a stage reports what it is doing. Implemented by the orchestrator's progress display
/// and run tracking; stages never print directly.
pub trait EventSink: Send + Sync {
    /// Countable work: `done` of `total` units (`total` unknown when `None`).
    fn progress(&self, done: u64, total: Option<u64>, unit: &str);
    fn log(&self, line: &str);
    fn metric(&self, name: &str, value: f64, step: Option<u64>);
}

/// Where a long stage keeps checkpoints, so that a run killed at any point (SIGKILL
/// included) resumes from the last one when rerun, on this machine or another that shares
/// the artifact store. Checkpoints belong to the artifact being produced (its cache key):
/// a stage with other params or inputs never sees them.
pub trait Checkpoints: Send + Sync {
    /// Stores every file in `dir` as the checkpoint for `step`; a later `latest` sees it only
    /// once it is complete.
    fn save(&self, step: u64, dir: &Path) -> Result<(), StageError>;
    /// The newest complete checkpoint, materialised into a fresh local directory.
    fn latest(&self) -> Result<Option<(u64, PathBuf)>, StageError>;
}

/// For contexts without a store (unit tests): keeps nothing.
pub struct NoCheckpoints;

impl Checkpoints for NoCheckpoints {
    fn save(&self, _: u64, _: &Path) -> Result<(), StageError> {
        Ok(())
    }
    fn latest(&self) -> Result<Option<(u64, PathBuf)>, StageError> {
        Ok(None)
    }
}

/// An upstream artifact, materialised as local files.
#[derive(Clone, Debug)]
pub struct InputArtifact {
    pub stage: String,
    pub kind: ArtifactKind,
    pub dir: PathBuf,
    pub digest: String,
    pub metadata: serde_json::Value,
}

/// What a running stage sees.
pub struct StageContext<'a> {
    /// The stage's name in the pipeline.
    pub stage: &'a str,
    /// The canonical `with:` block (defaults filled in).
    pub params: &'a serde_json::Value,
    /// Input name → the artifacts bound to it, in the order the YAML lists them.
    pub inputs: &'a BTreeMap<String, Vec<InputArtifact>>,
    /// An empty directory; everything left in it becomes the output artifact.
    pub out_dir: &'a Path,
    /// A scratch directory that is not stored.
    pub scratch_dir: &'a Path,
    /// The directory of the pipeline file, against which relative paths resolve.
    pub pipeline_dir: &'a Path,
    /// `cpu`, `cuda` or `cuda:N`, already resolved from `auto`.
    pub device: &'a str,
    pub events: &'a dyn EventSink,
    pub cancel: &'a CancelToken,
    pub checkpoints: &'a dyn Checkpoints,
}

impl StageContext<'_> {
    /// Parses the canonical params into the stage's own struct.
    pub fn params<P: DeserializeOwned>(&self) -> Result<P, StageError> {
        serde_json::from_value(self.params.clone())
            .map_err(|e| StageError::Failed(format!("invalid params: {e}")))
    }

    /// The single artifact bound to `name`, or an error naming the input.
    pub fn input(&self, name: &str) -> Result<&InputArtifact, StageError> {
        self.inputs
            .get(name)
            .and_then(|v| v.first())
            .ok_or_else(|| StageError::Failed(format!("input `{name}` is not bound")))
    }

    /// Returns `Err(Cancelled)` once cancellation was asked for: call it at safe points.
    pub fn checkpoint(&self) -> Result<(), StageError> {
        if self.cancel.is_cancelled() {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// What a successful stage hands back besides its files.
#[derive(Clone, Debug, Default)]
pub struct StageOutput {
    /// Stored in the artifact's manifest (statistics, reported sizes, ...).
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Stopped at a safe point because cancellation was asked for.
    #[error("cancelled")]
    Cancelled,
    /// A quality gate rejected the result; the orchestrator exits with its own code.
    #[error("quality gate failed: {0}")]
    Gate(String),
    #[error("{0}")]
    Failed(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl StageError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StageError::Io {
            context: context.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder a command left read-only inside the tree (Go's module cache does) is
    /// removed with the rest. (As root, which may remove it anyway, this checks the walk.)
    #[test]
    fn remove_tree_removes_read_only_folders() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("remove-tree-{}", std::process::id()));
        let inner = d.join("cache/mod");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::write(inner.join("f"), "x").unwrap();
        for ro in [&inner, &d.join("cache")] {
            std::fs::set_permissions(ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        remove_tree(&d).unwrap();
        assert!(!d.exists());
    }
    use serde_json::json;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        run: String,
        #[serde(default = "three")]
        steps: u32,
    }
    fn three() -> u32 {
        3
    }

    #[test]
    fn a_number_out_of_range_is_said_in_words() {
        let e = canonical_params::<P>(json!({"run": "x", "steps": -1})).unwrap_err();
        assert_eq!(
            e.problem,
            ParamProblem::Invalid(
                "invalid value: integer `-1`, expected a whole number from 0 to 4294967295".into()
            )
        );
    }

    #[test]
    fn canonical_params_fills_defaults() {
        let v = canonical_params::<P>(json!({"run": "x"})).unwrap();
        assert_eq!(v, json!({"run": "x", "steps": 3}));
    }

    #[test]
    fn unknown_key_names_the_key_and_the_known_ones() {
        let e = canonical_params::<P>(json!({"run": "x", "stpes": 1})).unwrap_err();
        assert_eq!(
            e.problem,
            ParamProblem::UnknownKey {
                key: "stpes".into(),
                expected: vec!["run".into(), "steps".into()]
            }
        );
    }

    #[test]
    fn missing_and_mistyped_keys_are_classified() {
        let e = canonical_params::<P>(json!({})).unwrap_err();
        assert_eq!(e.problem, ParamProblem::MissingKey { key: "run".into() });
        let e = canonical_params::<P>(json!({"run": "x", "steps": "many"})).unwrap_err();
        assert_eq!(e.path, vec![PathSegment::Key("steps".into())]);
        assert!(
            matches!(e.problem, ParamProblem::Invalid(m) if m.contains("expected a whole number from 0 to 4294967295"))
        );
    }

    #[test]
    fn child_token_sees_parent_cancel_but_not_the_reverse() {
        let root = CancelToken::new();
        let child = root.child();
        child.cancel();
        assert!(!root.is_cancelled());
        root.cancel();
        assert!(root.child().is_cancelled());
    }
}
