//! Garbage collection: keep the newest runs and pinned artifacts, delete what nothing uses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::key::CacheKey;
use crate::record::{RunRecord, StageStatus};
use crate::store::{Store, StoreError};

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub runs_kept: usize,
    pub runs_deleted: usize,
    pub artifacts_kept: usize,
    pub artifacts_deleted: usize,
    pub blobs_deleted: usize,
    /// Checkpoints of trainings that finished, or that only collected runs left unfinished.
    pub checkpoints_deleted: usize,
    /// Half-written objects that killed writes left in a `file://` store.
    pub staging_deleted: usize,
    pub bytes_freed: u64,
    /// Runs producing artifacts as gc ran (with locks and new run records that cannot be
    /// read: what they use is unknown); while there are any, unreferenced blobs and
    /// half-written objects stay.
    pub producing: usize,
    /// Kept run records that cannot be read even as JSON naming its stages' keys: what they
    /// use is unknown, so no artifact was deleted.
    pub unreadable_kept: usize,
    pub dry_run: bool,
    /// The digests of the artifacts kept, whose copies in a local cache stay (see
    /// [`tidy_local_cache`]).
    #[serde(skip)]
    pub kept_digests: HashSet<String>,
}

/// Adds the keys a run record that stays names to `keep`; where the record cannot be read
/// even for those, counts it in `unreadable_kept` (and then no artifact is deleted).
fn keep_what_it_names(
    keep: &mut HashSet<CacheKey>,
    report: &mut GcReport,
    salvaged: &HashMap<String, Option<Vec<CacheKey>>>,
    id: &str,
    run: &Option<RunRecord>,
) {
    match (run, salvaged.get(id)) {
        (Some(run), _) => keep.extend(run.keys()),
        (None, Some(Some(keys))) => keep.extend(keys.iter().cloned()),
        (None, _) => report.unreadable_kept += 1,
    }
}

/// The `key` of each stage a run record names, read as plain JSON: for a record this
/// version cannot parse (a newer version's in a shared store, one with a field damaged).
/// None where it is not JSON with a list of stages.
async fn salvage_keys(store: &Store, id: &str) -> Result<Option<Vec<CacheKey>>, StoreError> {
    match store.get_run::<serde_json::Value>(id).await {
        Ok(Some(v)) => Ok(v["stages"].as_array().map(|stages| {
            stages
                .iter()
                .filter_map(|s| s["key"].as_str())
                .map(|k| CacheKey(k.to_string()))
                .collect()
        })),
        // Deleted meanwhile (another gc): it names nothing any more.
        Ok(None) => Ok(Some(Vec::new())),
        Err(e) if e.is_damage() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes run records beyond the newest `keep_last` (a run going on now stays, however
/// old), then artifacts that no kept run uses and no pin names, then blobs that no remaining
/// artifact lists, then what killed writes left half-written. Objects younger than `grace` are
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
    // Runs going on now, however long ago they started (a training of hours, an Argo task
    // beside older tasks' records): their records stay with every key they name, their
    // inputs' included, which a later stage of theirs, or the workflow's next task, reads.
    // A live lock says so wherever the run is; on this host, so does its process.
    let locked: HashSet<String> = store
        .live_locks()
        .await?
        .holders
        .into_iter()
        .map(|l| l.run_id)
        .collect();
    let running = |id: &str, run: &Option<RunRecord>| {
        locked.contains(id) || run.as_ref().is_some_and(RunRecord::running_here)
    };
    let mut keep: HashSet<CacheKey> = pins.iter().map(|(key, _)| key.clone()).collect();
    // Oldest first. A record that does not parse names no artifact: without `--pipeline`
    // it is collected or kept by age like any other; with it, whose it is is unknown, so
    // it stays.
    let mut candidates: Vec<(String, Option<RunRecord>)> = Vec::new();
    // Every run record seen, so that runs recorded while gc walks are told apart (below).
    let mut seen: HashSet<String> = HashSet::new();
    // The keys of stages a run that stays did not finish: their checkpoints may be resumed
    // from (`run --force` trains again under a key whose artifact is stored).
    let mut resumable: HashSet<CacheKey> = HashSet::new();
    // The keys that records which do not parse as this version's still name (a newer
    // version's record in a shared store, a damaged one): None where not even those.
    let mut salvaged: HashMap<String, Option<Vec<CacheKey>>> = HashMap::new();
    for id in store.list_run_ids().await? {
        seen.insert(id.clone());
        let run = match store.get_run::<RunRecord>(&id).await {
            Ok(Some(run)) => Some(run),
            Ok(None) => continue,
            Err(e) if e.is_damage() => {
                salvaged.insert(id.clone(), salvage_keys(store, &id).await?);
                None
            }
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
            resumable.extend(run.iter().flat_map(unfinished));
            report.runs_kept += 1;
            keep_what_it_names(&mut keep, &mut report, &salvaged, &id, &run);
        }
    }
    let split = candidates.len().saturating_sub(keep_last);
    let (old, kept) = candidates.split_at(split);
    for (id, run) in kept {
        keep_what_it_names(&mut keep, &mut report, &salvaged, id, run);
    }
    report.runs_kept += kept.len();
    // A pinned run's record stays with its pins: without it, `unpin RUN` could not find
    // them, and `show` could not say what the pinned artifacts are.
    let holders: HashSet<String> = pins.into_iter().map(|(_, holder)| holder).collect();
    let now = SystemTime::now();
    let young = |t: SystemTime| now.duration_since(t).map(|age| age < grace).unwrap_or(true);
    // A run younger than the grace period stays too, with what it uses: it may still be
    // running (its record is written as it goes), and `--grace` promises that nothing that
    // young is touched. So does a run going on now, however old.
    let in_use = |id: &str, run: &Option<RunRecord>| {
        running(id, run)
            || run
                .as_ref()
                .is_some_and(|r| young(SystemTime::from(r.started_at)))
    };
    let (held, old): (Vec<_>, Vec<_>) = old
        .iter()
        .partition(|(id, run)| holders.contains(id) || in_use(id, run));
    // (A pinned run's record stays for its pins' sake: only the pinned keys are kept.)
    for (id, run) in &held {
        if in_use(id, run) {
            keep_what_it_names(&mut keep, &mut report, &salvaged, id, run);
        }
    }
    report.runs_kept += held.len();
    for (_, run) in kept.iter().chain(held.iter().copied()) {
        resumable.extend(run.iter().flat_map(unfinished));
    }
    let given_up: HashSet<CacheKey> = old
        .iter()
        .filter_map(|(_, run)| run.as_ref())
        .flat_map(RunRecord::keys)
        .filter(|key| !keep.contains(key))
        .collect();
    // Listed once: for the checkpoints' rule, and for the walk below.
    let manifests = store.list_manifest_keys().await?;
    let stored: HashSet<CacheKey> = manifests.iter().map(|(key, _)| key.clone()).collect();
    let dropped =
        drop_collectable_checkpoints(store, &stored, &resumable, &given_up, dry_run, &mut report)
            .await?;

    // (Those of the checkpoints just dropped count as gone in a dry run too.)
    let mut live_blobs: HashSet<String> = store
        .checkpoint_blobs(&dropped)
        .await?
        .into_iter()
        .collect();
    let mut kept_keys: HashSet<CacheKey> = HashSet::new();
    // Each manifest the walk saw, and when it was written.
    let mut walked: HashMap<CacheKey, SystemTime> = HashMap::new();
    let mut unused: Vec<CacheKey> = Vec::new();
    for (key, modified) in manifests {
        walked.insert(key.clone(), modified);
        if keep.contains(&key) || young(modified) {
            // A kept artifact's files must be known before any blob goes: a manifest that
            // cannot be read (the store unreachable, or the manifest corrupt) stops the
            // collection rather than letting its files be taken for garbage.
            keep_files_of(store, &key, &mut live_blobs, &mut report.kept_digests).await?;
            kept_keys.insert(key);
        } else {
            unused.push(key);
        }
    }
    // A run recorded since the listing above (it planned while gc walked) may be about to
    // use an artifact it found stored, however old: what it names stays.
    let mut unreadable_new_runs = 0;
    for id in store.list_run_ids().await? {
        if seen.contains(&id) {
            continue;
        }
        match store.get_run::<RunRecord>(&id).await {
            Ok(Some(run)) => keep.extend(run.keys()),
            // Deleted meanwhile (another gc).
            Ok(None) => {}
            // What a run that cannot be read uses is unknown: no blob goes (below).
            Err(e) if e.is_damage() => unreadable_new_runs += 1,
            Err(e) => return Err(e),
        }
    }
    for key in unused {
        if keep.contains(&key) || report.unreadable_kept > 0 {
            keep_files_of(store, &key, &mut live_blobs, &mut report.kept_digests).await?;
            kept_keys.insert(key);
            continue;
        }
        report.artifacts_deleted += 1;
        if !dry_run {
            store.delete_manifest(&key).await?;
        }
    }
    report.artifacts_kept = kept_keys.len();
    // Looked at last, right before blobs go, to leave the smallest window (a stage that
    // commits meanwhile checks its blobs again after its commit, see `exec::store_output`).
    report.producing = store.live_locks().await?.count() + unreadable_new_runs;
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
            keep_files_of(store, &key, &mut live_blobs, &mut report.kept_digests).await?;
        }
    }
    // A blob shared by a kept artifact and a deleted one stays.
    let mut looked = std::time::Instant::now();
    for (digest, size, modified) in store.list_blobs().await? {
        if !live_blobs.contains(&digest) && !young(modified) && report.producing == 0 {
            // Deleting many blobs from S3 takes minutes: a run that starts meanwhile may
            // find one of them stored and reuse it. Looked at again every second, and the
            // rest stay once one is producing (what it reused it puts back after its
            // commit, see `exec::store_output`, unless it is killed in between).
            if looked.elapsed() >= Duration::from_secs(1) {
                looked = std::time::Instant::now();
                report.producing = store.live_locks().await?.count();
                if report.producing > 0 {
                    continue;
                }
            }
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
    // Last, as tidying: what killed writes left half-written (while nothing is producing,
    // and older than the grace period: a write under way is neither).
    if report.producing == 0 {
        let before = now.checked_sub(grace).unwrap_or(std::time::UNIX_EPOCH);
        let local = store.clone();
        let (n, bytes) =
            tokio::task::spawn_blocking(move || local.staging_leftovers(before, dry_run))
                .await
                .unwrap_or((0, 0));
        report.staging_deleted = n;
        report.bytes_freed += bytes;
    }
    // A stale lock's takeover object that its taker, killed while taking over, left: stale
    // itself (a lease over), so no taker is using it.
    if !dry_run {
        store.clear_leftover_markers().await?;
    }
    Ok(report)
}

/// What [`tidy_local_cache`] removed, or would.
#[derive(Debug, Default, Serialize)]
pub struct LocalReport {
    /// Working folders of runs over (failed or cancelled ones keep theirs for reading).
    pub work_deleted: usize,
    /// Downloaded copies of artifacts the store no longer keeps, and half-downloaded ones.
    pub copies_deleted: usize,
    pub bytes_freed: u64,
    /// Runs going on now from this cache: while there are any, downloaded copies stay.
    pub live_runs: usize,
    /// The cache's copies come from another store than the one collected: they stay.
    pub other_store: bool,
}

/// The file in a local cache's `artifacts/` naming the store its copies come from (its
/// [`Store::identity`]), written by each run and by `serve STAGE` before it downloads.
pub const STORE_MARK: &str = "STORE";

/// Notes which store the downloaded copies in the local cache `cache` come from, before one
/// is downloaded: `gc` of another store leaves them alone (see [`tidy_local_cache`]).
pub fn mark_local_cache(cache: &Path, store: &str) {
    let dir = cache.join("artifacts");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = crate::write_whole(&dir.join(STORE_MARK), store.as_bytes());
    }
}

/// Tidies a local cache (`.orchestrate/`) after `gc`: each run's working folders, which a
/// run that failed or was cancelled keeps (its outputs, for reading), once the run is over
/// and older than `grace`; and the downloaded copies of artifacts (`artifacts/<digest>`) no
/// longer among `kept` (digests of the artifacts the store `store` keeps), with what
/// interrupted downloads left, older than `grace`, while no run from this cache goes on (one
/// may be reading them), and only where the copies come from that store (a `gc` of a
/// scratch store would otherwise take every copy of another). A run is going on while it
/// holds its spool's lock (see `tracking`); a lock file nothing holds and no spool needs goes.
pub fn tidy_local_cache(
    cache: &Path,
    store: &str,
    kept: &HashSet<String>,
    grace: Duration,
    dry_run: bool,
) -> LocalReport {
    let mut report = LocalReport::default();
    let now = SystemTime::now();
    let old = |p: &Path| {
        std::fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age >= grace))
    };
    let remove = |dir: &Path, report_count: &mut usize, bytes: &mut u64| {
        *bytes += folder_bytes(dir);
        *report_count += 1;
        if !dry_run {
            let _ = std::fs::remove_dir_all(dir);
        }
    };
    let entries = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    // The runs going on from this cache, by id.
    let mut live: HashSet<std::ffi::OsString> = HashSet::new();
    for lock in entries(&cache.join("spool")) {
        if lock.extension().is_none_or(|e| e != "lock") {
            continue;
        }
        match lock.file_stem() {
            Some(id) if crate::tracking::lock_is_held(&lock) => {
                live.insert(id.to_owned());
            }
            // A run over whose spool was delivered and removed leaves its lock file.
            _ if !lock.with_extension("jsonl").exists() && old(&lock) && !dry_run => {
                let _ = std::fs::remove_file(&lock);
            }
            _ => {}
        }
    }
    report.live_runs = live.len();
    let mut bytes = 0;
    for dir in entries(&cache.join("work"))
        .into_iter()
        .filter(|d| d.is_dir())
    {
        let ours = dir.file_name().is_some_and(|id| live.contains(id));
        if !ours && old(&dir) {
            remove(&dir, &mut report.work_deleted, &mut bytes);
        }
    }
    let copies = cache.join("artifacts");
    let same_store = std::fs::read_to_string(copies.join(STORE_MARK)).is_ok_and(|s| s == store);
    report.other_store = !same_store && copies.is_dir();
    if live.is_empty() && same_store {
        for dir in entries(&copies).into_iter().filter(|d| d.is_dir()) {
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // `<hex>`, or `<hex>.partial-…` / `<hex>.stale-…` left by an interrupted download.
            let (hex, leftover) = match name.split_once('.') {
                Some((hex, _)) => (hex, true),
                None => (name, false),
            };
            if (leftover || !kept.contains(&format!("blake3:{hex}"))) && old(&dir) {
                remove(&dir, &mut report.copies_deleted, &mut bytes);
            }
        }
    }
    report.bytes_freed = bytes;
    report
}

/// The bytes of the files under `dir`, links not followed.
fn folder_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => folder_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// Adds the blobs of `key`'s manifest to `live` and its digest to `artifacts` (none where it
/// is gone). A manifest that cannot be read stops the collection: its files must not be
/// taken for garbage.
async fn keep_files_of(
    store: &Store,
    key: &CacheKey,
    live: &mut HashSet<String>,
    artifacts: &mut HashSet<String>,
) -> Result<(), StoreError> {
    if let Some(m) = store.manifest(key).await? {
        live.extend(m.files.into_iter().map(|f| f.digest));
        artifacts.insert(m.digest);
    }
    Ok(())
}

/// Drops checkpoints that can no longer be resumed from, or are not meant to be: those of a
/// training whose artifact is stored (a run killed between its commit and dropping them
/// leaves them), and those of a training given up (every run that trained under its key
/// collected: new params). A key a run that stays did not finish (`resumable`: a killed
/// `run --force`, a pinned run's) keeps them, as does one no run names yet. While anything
/// is producing, nothing goes: a training may be resuming. Returns the keys dropped (or, in
/// a dry run, that would be). `stored`: the keys with a manifest.
async fn drop_collectable_checkpoints(
    store: &Store,
    stored: &HashSet<CacheKey>,
    resumable: &HashSet<CacheKey>,
    given_up: &HashSet<CacheKey>,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<HashSet<CacheKey>, StoreError> {
    let mut steps: BTreeMap<CacheKey, usize> = BTreeMap::new();
    for (key, _) in store.all_checkpoints().await? {
        *steps.entry(key).or_default() += 1;
    }
    let mut dropped = HashSet::new();
    for (key, n) in steps {
        if resumable.contains(&key) || !(stored.contains(&key) || given_up.contains(&key)) {
            continue;
        }
        // Looked at for each key, right before it goes: a run that started meanwhile may be
        // resuming from it.
        if store.live_locks().await?.count() > 0 {
            break;
        }
        report.checkpoints_deleted += n;
        if !dry_run {
            store.drop_checkpoints(&key).await?;
        }
        dropped.insert(key);
    }
    Ok(dropped)
}

/// The keys of a run's stages that did not finish (pending or running when it was killed,
/// failed or cancelled).
fn unfinished(run: &RunRecord) -> impl Iterator<Item = CacheKey> + '_ {
    run.stages
        .iter()
        .filter(|s| {
            matches!(
                s.status,
                StageStatus::Pending
                    | StageStatus::Running
                    | StageStatus::Failed
                    | StageStatus::Cancelled
            )
        })
        .filter_map(|s| s.key.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{RunStatus, StageRecord};

    fn run(id: &str, hours_ago: i64, key: &str) -> RunRecord {
        let mut stage = StageRecord::new("model", "train", StageStatus::Pending);
        stage.key = Some(CacheKey(key.into()));
        RunRecord {
            id: id.into(),
            pipeline: "p".into(),
            pipeline_path: "p.yaml".into(),
            pipeline_digest: "d".into(),
            git_commit: None,
            host: "elsewhere".into(),
            pid: 0,
            args: Vec::new(),
            started_at: chrono::Utc::now() - chrono::Duration::hours(hours_ago),
            ended_at: None,
            status: RunStatus::Running,
            stages: vec![stage],
        }
    }

    /// A write killed halfway leaves `NAME#N` in a `file://` store, which its listings pass
    /// over: gc removes those older than the grace period, and nothing else.
    #[tokio::test]
    async fn half_written_objects_of_killed_writes_are_collected() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open("file://store", tmp.path()).unwrap();
        // (In a folder of its own: gc's other rules would take an unlisted blob too.)
        let dir = tmp.path().join("store/elsewhere/ab");
        std::fs::create_dir_all(&dir).unwrap();
        // (`abcd#1#2` is an object to object_store: its first `#` is not followed by digits
        // alone.)
        for name in ["abcd#1", "abcd#12", "abcd#x", "abcd#1#2", "abcd"] {
            std::fs::write(dir.join(name), "12345").unwrap();
        }
        let r = collect(&store, None, 1, Duration::from_secs(3600), false)
            .await
            .unwrap();
        assert_eq!(r.staging_deleted, 0, "younger than the grace period");
        let dry = collect(&store, None, 1, Duration::ZERO, true)
            .await
            .unwrap();
        assert_eq!(
            (dry.staging_deleted, dir.join("abcd#1").exists()),
            (2, true)
        );
        let r = collect(&store, None, 1, Duration::ZERO, false)
            .await
            .unwrap();
        assert_eq!((r.staging_deleted, r.bytes_freed), (2, 10), "{r:?}");
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["abcd", "abcd#1#2", "abcd#x"]);
    }

    /// A lock that does not read as one (another version's) counts as a run producing for a
    /// lease after it was written: the blob nothing names yet stays until then.
    #[tokio::test]
    async fn a_lock_that_cannot_be_read_keeps_unreferenced_blobs() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open("file://store", tmp.path()).unwrap();
        std::fs::write(
            tmp.path().join("out.bin"),
            "made by a run not committed yet",
        )
        .unwrap();
        store
            .put_file(&tmp.path().join("out.bin"), "out.bin")
            .await
            .unwrap();
        std::fs::create_dir_all(tmp.path().join("store/locks")).unwrap();
        let lock = tmp.path().join("store/locks/k.json");
        std::fs::write(&lock, r#"{"holder": "a later version"}"#).unwrap();
        let r = collect(&store, None, 1, Duration::ZERO, false)
            .await
            .unwrap();
        assert_eq!((r.producing, r.blobs_deleted), (1, 0), "{r:?}");
        // Once older than a lease, no holder wrote it: left behind, it stops nothing.
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&lock)
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
        let r = collect(&store, None, 1, Duration::ZERO, false)
            .await
            .unwrap();
        assert_eq!((r.producing, r.blobs_deleted), (0, 1), "{r:?}");
    }

    /// A run going on from a local cache (holding its spool's lock) keeps its working
    /// folder, and every downloaded artifact; once it is over, both go.
    #[test]
    fn a_live_run_keeps_its_local_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path();
        for dir in [
            "work/r1/train-1",
            "artifacts/abcd/files",
            "artifacts/ef01.partial-7-0",
        ] {
            std::fs::create_dir_all(cache.join(dir)).unwrap();
        }
        std::fs::write(cache.join("artifacts/abcd/files/x"), "12345").unwrap();
        std::fs::create_dir_all(cache.join("spool")).unwrap();
        let lock = std::fs::File::create(cache.join("spool/r1.lock")).unwrap();
        lock.lock().unwrap();
        std::fs::write(cache.join("artifacts").join(STORE_MARK), "file:///s").unwrap();
        let kept = HashSet::new();
        let r = tidy_local_cache(cache, "file:///s", &kept, Duration::ZERO, false);
        assert_eq!(
            (r.live_runs, r.work_deleted, r.copies_deleted),
            (1, 0, 0),
            "{r:?}"
        );
        drop(lock);
        let r = tidy_local_cache(cache, "file:///s", &kept, Duration::ZERO, true);
        assert_eq!(
            (r.work_deleted, r.copies_deleted, r.bytes_freed),
            (1, 2, 5),
            "{r:?}"
        );
        assert!(cache.join("work/r1").exists(), "a dry run deletes nothing");
        // Collecting another store leaves this one's copies alone (a run's folders go).
        let r = tidy_local_cache(cache, "file:///scratch", &kept, Duration::ZERO, true);
        assert_eq!(
            (r.work_deleted, r.copies_deleted, r.other_store),
            (1, 0, true),
            "{r:?}"
        );
        let kept = HashSet::from(["blake3:abcd".to_string()]);
        let r = tidy_local_cache(cache, "file:///s", &kept, Duration::ZERO, false);
        assert_eq!((r.work_deleted, r.copies_deleted), (1, 1), "{r:?}");
        assert!(!cache.join("work/r1").exists());
        assert!(cache.join("artifacts/abcd/files/x").exists());
        // The run's lock file, free and with no spool left, went too.
        assert!(!cache.join("spool/r1.lock").exists());
    }

    /// An empty Model artifact stored under `key`.
    fn manifest(key: &str) -> crate::store::Manifest {
        let digest =
            crate::store::Manifest::content_digest(orchestrate_stage::ArtifactKind::Model, &[]);
        serde_json::from_value(serde_json::json!({
            "format": 1, "key": key, "kind": "Model", "pipeline": "p", "stage": "model",
            "digest": digest, "files": [], "metadata": {},
            "producer": {"run_id": "r0", "host": "h", "created_at": "", "duration_ms": 0},
            "key_parts": {"format": 1, "kind": "train", "code": "c", "params": {},
                          "inputs": {}, "files": {}, "device": null},
        }))
        .unwrap()
    }

    /// A run going on now, on this host, stays with what it names however long ago it
    /// started and however many runs came after it; one whose process is gone does not.
    #[tokio::test]
    async fn a_run_going_on_keeps_what_it_names_however_old() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open("file://store", tmp.path()).unwrap();
        for key in ["its-input", "killed-input", "newest-input"] {
            store.commit(&manifest(key)).await.unwrap();
        }
        let here = |id: &str, hours_ago, key: &str, pid| RunRecord {
            host: crate::store::hostname(),
            pid,
            ..run(id, hours_ago, key)
        };
        store
            .put_run("live", &here("live", 5, "its-input", std::process::id()))
            .await
            .unwrap();
        store
            .put_run("killed", &here("killed", 4, "killed-input", u32::MAX - 1))
            .await
            .unwrap();
        store
            .put_run("newest", &run("newest", 1, "newest-input"))
            .await
            .unwrap();
        let r = collect(&store, None, 1, Duration::ZERO, false)
            .await
            .unwrap();
        assert_eq!((r.runs_deleted, r.artifacts_deleted), (1, 1), "{r:?}");
        assert!(store.get_run::<RunRecord>("live").await.unwrap().is_some());
        assert!(store
            .get_run::<RunRecord>("killed")
            .await
            .unwrap()
            .is_none());
        let key = |k: &str| CacheKey(k.into());
        assert!(store.manifest(&key("its-input")).await.unwrap().is_some());
        assert!(store
            .manifest(&key("killed-input"))
            .await
            .unwrap()
            .is_none());
    }

    /// One entry per checkpoint (key and step), in `all_checkpoints`' order.
    async fn checkpoint_keys(store: &Store) -> Vec<String> {
        let all = store.all_checkpoints().await.unwrap();
        all.into_iter().map(|(key, _)| key.0).collect()
    }

    /// A training given up (its only run collected) loses its checkpoints and their blobs;
    /// one a kept run names, and one no run names yet (a run killed before its record
    /// named the key), stay resumable.
    #[tokio::test]
    async fn checkpoints_go_with_the_last_run_that_trained_them() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let store = Store::open("file://store", d).unwrap();
        for (i, key) in ["given-up", "kept", "unnamed"].iter().enumerate() {
            let weights = d.join(format!("w{i}"));
            std::fs::write(&weights, format!("weights {key}")).unwrap();
            let file = store.put_file(&weights, "w").await.unwrap();
            for step in [10, 20] {
                let key = CacheKey(key.to_string());
                store
                    .put_checkpoint(&key, step, std::slice::from_ref(&file))
                    .await
                    .unwrap();
            }
        }
        store
            .put_run("r1", &run("r1", 3, "given-up"))
            .await
            .unwrap();
        store.put_run("r2", &run("r2", 2, "kept")).await.unwrap();
        let dry = collect(&store, None, 1, Duration::ZERO, true)
            .await
            .unwrap();
        assert_eq!(dry.checkpoints_deleted, 2);
        assert_eq!(store.all_checkpoints().await.unwrap().len(), 6);
        let r = collect(&store, None, 1, Duration::ZERO, false)
            .await
            .unwrap();
        assert_eq!(
            (r.runs_deleted, r.checkpoints_deleted, r.blobs_deleted),
            (1, 2, 1)
        );
        assert_eq!(
            checkpoint_keys(&store).await,
            ["kept", "kept", "unnamed", "unnamed"]
        );

        // A stored artifact's checkpoints go; unless a run that stays is training under
        // its key again (`run --force`), killed before it finished.
        for key in ["kept", "unnamed"] {
            store.commit(&manifest(key)).await.unwrap();
        }
        let r = collect(&store, None, 1, Duration::ZERO, false)
            .await
            .unwrap();
        assert_eq!(r.checkpoints_deleted, 2, "{r:?}");
        assert_eq!(checkpoint_keys(&store).await, ["kept", "kept"]);
    }
}
