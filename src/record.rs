//! Run records: what every `orchestrate run` did, kept in the store beside the artifacts.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::key::CacheKey;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Reused an artifact already in the store.
    Cached,
    Ran,
    Failed,
    /// Not run because a stage it depends on failed or was cancelled.
    Skipped,
    Cancelled,
    /// Left out by `--only` / `--from`.
    NotSelected,
    /// Selected to run and not started: what a running (or killed) run's record shows for
    /// the stages it has not come to yet.
    Pending,
    /// Started and not finished: what a running run's record shows for a stage at work (a
    /// killed run's, for the stages it was doing).
    Running,
}

impl StageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Cached => "cached",
            StageStatus::Ran => "ran",
            StageStatus::Failed => "failed",
            StageStatus::Skipped => "skipped",
            StageStatus::Cancelled => "cancelled",
            StageStatus::NotSelected => "not selected",
            StageStatus::Pending => "pending",
            StageStatus::Running => "running",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: String,
    pub kind: String,
    pub status: StageStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<CacheKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    /// For a cached stage, the run that produced the artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub produced_by: Option<String>,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The failure was the artifact store's (unreachable, unreadable, a corrupt input),
    /// not the stage's work: the run exits 3, not 1.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub store_error: bool,
    /// Last value of each metric the stage reported.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

impl StageRecord {
    pub fn new(stage: &str, kind: &str, status: StageStatus) -> Self {
        StageRecord {
            stage: stage.to_string(),
            kind: kind.to_string(),
            status,
            started_at: None,
            ended_at: None,
            duration_ms: 0,
            key: None,
            artifact: None,
            produced_by: None,
            attempts: 0,
            error: None,
            store_error: false,
            metrics: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub pipeline: String,
    pub pipeline_path: String,
    pub pipeline_digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    pub host: String,
    /// With `host`, tells a live run from one that was killed.
    #[serde(default)]
    pub pid: u32,
    pub args: Vec<String>,
    pub started_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    pub status: RunStatus,
    pub stages: Vec<StageRecord>,
}

impl RunRecord {
    pub fn count(&self, status: StageStatus) -> usize {
        self.stages.iter().filter(|s| s.status == status).count()
    }

    /// How long the run took; for one that recorded no end (killed, or going on), how long
    /// it ran at least: to the last start or end of a stage its record holds.
    pub fn duration_ms(&self) -> u64 {
        let last_known = || {
            self.stages
                .iter()
                .flat_map(|s| [s.started_at, s.ended_at])
                .flatten()
                .max()
        };
        self.ended_at
            .or_else(last_known)
            .map(|e| (e - self.started_at).num_milliseconds().max(0) as u64)
            .unwrap_or(0)
    }

    /// The cache keys its stages name (those known when the record was written).
    pub fn keys(&self) -> impl Iterator<Item = CacheKey> + '_ {
        self.stages.iter().filter_map(|s| s.key.clone())
    }

    /// Recorded as running, on this host, by a process that is still there (whether a run
    /// elsewhere is alive, only its live locks tell).
    pub fn running_here(&self) -> bool {
        self.status == RunStatus::Running && self.ran_here() && self.process_exists()
    }

    /// Recorded as running, on this host, by a process that is gone: killed.
    pub fn killed_here(&self) -> bool {
        self.status == RunStatus::Running && self.ran_here() && !self.process_exists()
    }

    fn ran_here(&self) -> bool {
        self.host == crate::store::hostname() && self.pid != 0
    }

    fn process_exists(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// Sortable by start time and unique across hosts: `20261126T081500.123Z-4f2a`.
pub fn new_run_id(now: DateTime<Utc>) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&now.timestamp_nanos_opt().unwrap_or(0).to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(crate::store::hostname().as_bytes());
    format!(
        "{}-{}",
        now.format("%Y%m%dT%H%M%S%.3fZ"),
        &h.finalize().to_hex()[..6]
    )
}

/// The commit checked out around `dir`, read from `.git` directly (no `git` process: this
/// runs on every `orchestrate run`, cached ones included).
pub fn git_commit(dir: &Path) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    let git = dir
        .ancestors()
        .map(|d| d.join(".git"))
        .find(|g| g.exists())?;
    let git = if git.is_file() {
        // A worktree or submodule: `.git` is a file pointing at the real directory.
        let text = std::fs::read_to_string(&git).ok()?;
        let target = text.trim().strip_prefix("gitdir: ")?;
        git.parent()?.join(target)
    } else {
        git
    };
    let head = std::fs::read_to_string(git.join("HEAD")).ok()?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref: ") else {
        return Some(head.to_string());
    };
    if let Ok(c) = std::fs::read_to_string(git.join(reference)) {
        return Some(c.trim().to_string());
    }
    // The common dir holds refs for worktrees; packed-refs holds refs after `git gc`.
    let common = std::fs::read_to_string(git.join("commondir"))
        .map(|c| git.join(c.trim()))
        .unwrap_or_else(|_| git.clone());
    if let Ok(c) = std::fs::read_to_string(common.join(reference)) {
        return Some(c.trim().to_string());
    }
    let packed = std::fs::read_to_string(common.join("packed-refs")).ok()?;
    packed
        .lines()
        .find(|l| l.ends_with(reference))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_sort_by_time() {
        let a = new_run_id("2026-01-02T03:04:05.006Z".parse().unwrap());
        let b = new_run_id("2026-01-02T03:04:05.100Z".parse().unwrap());
        assert!(a.starts_with("20260102T030405.006Z-"));
        assert!(a < b);
    }

    #[test]
    fn git_commit_reads_a_checkout() {
        // A checkout of its own (this source may be an unpacked archive): HEAD on a branch
        // whose ref is a loose file, then packed, then detached; read from a folder below.
        let repo = tempfile::tempdir().unwrap();
        let git = repo.path().join(".git");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(git.join("refs/heads")).unwrap();
        std::fs::create_dir_all(repo.path().join("pipelines")).unwrap();
        std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(git.join("refs/heads/main"), format!("{commit}\n")).unwrap();
        let below = repo.path().join("pipelines");
        assert_eq!(git_commit(&below).as_deref(), Some(commit));
        std::fs::remove_file(git.join("refs/heads/main")).unwrap();
        std::fs::write(
            git.join("packed-refs"),
            format!("# pack-refs with: peeled\n{commit} refs/heads/main\n"),
        )
        .unwrap();
        assert_eq!(git_commit(&below).as_deref(), Some(commit));
        let detached = "89abcdef0123456789abcdef0123456789abcdef";
        std::fs::write(git.join("HEAD"), format!("{detached}\n")).unwrap();
        assert_eq!(git_commit(&below).as_deref(), Some(detached));
        let bare = tempfile::tempdir().unwrap();
        assert_eq!(git_commit(bare.path()), None);
    }
}
