//! Garbage collection: keep the newest runs and pinned artifacts, delete what nothing uses.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::key::CacheKey;
use crate::record::RunRecord;
use crate::store::{Store, StoreError};

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub runs_kept: usize,
    pub runs_deleted: usize,
    pub artifacts_kept: usize,
    pub artifacts_deleted: usize,
    pub blobs_deleted: usize,
    pub bytes_freed: u64,
    /// Runs producing artifacts as gc ran; while there are any, unreferenced blobs stay.
    pub producing: usize,
    pub dry_run: bool,
}

/// Deletes run records beyond the newest `keep_last`, then artifacts that no kept run uses and
/// no pin names, then blobs that no remaining artifact lists. Objects younger than `grace` are
/// kept whatever: a run in progress uploads blobs before its manifest and records its keys
/// only when its stages finish. With `pipeline`, only that pipeline's runs are collected
/// (`keep_last` counts them alone): a store shared by several pipelines keeps the others'.
pub async fn collect(
    store: &Store,
    pipeline: Option<&str>,
    keep_last: usize,
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport, StoreError> {
    let mut report = GcReport {
        dry_run,
        ..Default::default()
    };
    // Pins, read once: their keys are kept, and so are their holders' run records (below).
    let pins = store.pin_holders().await?;
    let mut keep: HashSet<CacheKey> = pins.iter().map(|(key, _)| key.clone()).collect();
    // Oldest first. A record that does not parse names no artifact: without `--pipeline`
    // it is collected or kept by age like any other; with it, whose it is is unknown, so
    // it stays.
    let mut candidates: Vec<(String, Option<RunRecord>)> = Vec::new();
    for id in store.list_run_ids().await? {
        let run = match store.get_run::<RunRecord>(&id).await {
            Ok(Some(run)) => Some(run),
            Ok(None) => continue,
            Err(e) if e.is_damage() => None,
            Err(e) => return Err(e),
        };
        let ours = match (&run, pipeline) {
            (_, None) => true,
            (Some(run), Some(p)) => run.pipeline == p,
            (None, Some(_)) => false,
        };
        if ours {
            candidates.push((id, run));
        } else {
            keep.extend(
                run.iter()
                    .flat_map(|r| r.stages.iter().filter_map(|s| s.key.clone())),
            );
            report.runs_kept += 1;
        }
    }
    let split = candidates.len().saturating_sub(keep_last);
    let (old, kept) = candidates.split_at(split);
    for run in kept.iter().filter_map(|(_, run)| run.as_ref()) {
        keep.extend(run.stages.iter().filter_map(|s| s.key.clone()));
    }
    report.runs_kept += kept.len();
    // A pinned run's record stays with its pins: without it, `unpin RUN` could not find
    // them, and `show` could not say what the pinned artifacts are.
    let holders: HashSet<String> = pins.into_iter().map(|(_, holder)| holder).collect();
    let now = SystemTime::now();
    let young = |t: SystemTime| now.duration_since(t).map(|age| age < grace).unwrap_or(true);
    // A run younger than the grace period stays too, with what it uses: it may still be
    // running (its record is written as it goes), and `--grace` promises that nothing that
    // young is touched.
    let (held, old): (Vec<_>, Vec<_>) = old.iter().partition(|(id, run)| {
        holders.contains(id)
            || run
                .as_ref()
                .is_some_and(|r| young(SystemTime::from(r.started_at)))
    });
    // (A pinned run's record stays for its pins' sake: only the pinned keys are kept.)
    for run in held.iter().filter_map(|(_, run)| run.as_ref()) {
        if young(SystemTime::from(run.started_at)) {
            keep.extend(run.stages.iter().filter_map(|s| s.key.clone()));
        }
    }
    report.runs_kept += held.len();

    let mut live_blobs: HashSet<String> = store.checkpoint_blobs().await?.into_iter().collect();
    let mut kept_keys: HashSet<CacheKey> = HashSet::new();
    // Each manifest the walk saw, and when it was written.
    let mut walked: HashMap<CacheKey, SystemTime> = HashMap::new();
    for (key, modified) in store.list_manifest_keys().await? {
        walked.insert(key.clone(), modified);
        if keep.contains(&key) || young(modified) {
            // A kept artifact's files must be known before any blob goes: a manifest that
            // cannot be read (the store unreachable, or the manifest corrupt) stops the
            // collection rather than letting its files be taken for garbage.
            if let Some(m) = store.manifest(&key).await? {
                live_blobs.extend(m.files.iter().map(|f| f.digest.clone()));
            }
            kept_keys.insert(key);
            report.artifacts_kept += 1;
        } else {
            report.artifacts_deleted += 1;
            if !dry_run {
                store.delete_manifest(&key).await?;
            }
        }
    }
    // Looked at last, right before blobs go, to leave the smallest window (a stage that
    // commits meanwhile checks its blobs again after its commit, see `exec::store_output`).
    report.producing = store.live_locks().await?.len();
    // A run that took its lock after the walk began and released it before the look above
    // committed meanwhile: its manifest may list an old blob it found stored and reused
    // (a reuse does not make a blob young). Manifests are listed again, after the locks,
    // and those the walk did not see, or saw older, keep their blobs.
    if report.producing == 0 {
        for (key, modified) in store.list_manifest_keys().await? {
            // (Written again under the same key: `run --force`.)
            if walked.get(&key) == Some(&modified) {
                continue;
            }
            if let Some(m) = store.manifest(&key).await? {
                live_blobs.extend(m.files.iter().map(|f| f.digest.clone()));
            }
        }
    }
    // A blob shared by a kept artifact and a deleted one stays.
    for (digest, size, modified) in store.list_blobs().await? {
        if !live_blobs.contains(&digest) && !young(modified) && report.producing == 0 {
            report.blobs_deleted += 1;
            report.bytes_freed += size;
            if !dry_run {
                store.delete_blob(&digest).await?;
            }
        }
    }
    if !dry_run {
        store.prune_history(&kept_keys).await?;
        for (id, _) in &old {
            store.delete_run(id).await?;
        }
    }
    report.runs_deleted = old.len();
    Ok(report)
}
