//! Runs a plan: ready stages concurrently (up to `jobs`), each under a store lock, its work on
//! a blocking thread, its outputs uploaded and then committed with a create-only manifest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use chrono::Utc;
use futures::StreamExt;
use orchestrate_stage::{
    CancelToken, Checkpoints, EventSink, InputArtifact, StageContext, StageError,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::key::CacheKey;
use crate::pipeline::Pipeline;
use crate::plan::{key_parts, Plan, Status};
use crate::record::{RunRecord, RunStatus, StageRecord, StageStatus};
use crate::report::Reporter;
use crate::store::{
    hostname, unix_now, FileEntry, LockAttempt, LockInfo, Manifest, Producer, Store, StoreError,
};
use crate::tracking::{flatten_params, SystemSampler, Tracker};

/// How long a lock holds without renewal. A holder renews it every `LOCK_RENEW`; a renewal
/// is a read then a write, each of which the store's client may retry for its whole window
/// (`store::retry_window`, 60 s by default) plus a last request (up to 30 s), and the lease
/// outlasts one such renewal with a margin: 220 s by default. A store slow for longer (two
/// renewals in a row each taking minutes) can let the lease lapse under a live holder: a
/// waiter then takes the key over and both produce, and the create-only commit keeps the
/// store right (one artifact stored, the other run reusing it). (The read and the write are
/// two calls: another run could slip between them only after the lease had lapsed, with the
/// same outcome.) A holder that died on this machine is seen at once, its process gone;
/// elsewhere when the lease runs out.
pub(crate) fn lock_lease() -> Duration {
    LOCK_RENEW + 2 * (crate::store::retry_window() + Duration::from_secs(30)) + LOCK_RENEW
}
const LOCK_RENEW: Duration = Duration::from_secs(20);
const LOCK_POLL: Duration = Duration::from_millis(200);
/// How long an interrupted run goes on delivering its tracking records before it exits.
const DELIVERY_AFTER_INTERRUPT: Duration = Duration::from_secs(10);
/// The longest wait between two looks at a lock another run holds.
const LOCK_POLL_MOST: Duration = Duration::from_secs(2);
/// Concurrent blob uploads per stage.
const UPLOADS: usize = 8;

pub struct ExecOptions {
    /// From [`crate::record::new_run_id`]; names the run record and the tracking spool.
    pub run_id: String,
    pub jobs: usize,
    /// Where tracking records go (spooled, then delivered to MLflow when configured).
    pub tracker: Arc<Tracker>,
    pub experiment: String,
    /// Seconds between system-metric samples.
    pub system_metrics_every: Duration,
    /// Local scratch: stage working directories and materialised inputs.
    pub cache_dir: PathBuf,
    pub args: Vec<String>,
    /// `run --repair`: a damaged manifest met while running (a stage whose key the plan
    /// could not know yet) is set aside and the stage run, as the plan does for the others.
    pub repair: bool,
}

struct Shared {
    pipeline: Arc<Pipeline>,
    store: Store,
    reporter: Arc<dyn Reporter>,
    cancel: CancelToken,
    run_id: String,
    work_root: PathBuf,
    artifact_cache: PathBuf,
    jobs: Arc<Semaphore>,
    tracker: Arc<Tracker>,
    experiment: String,
    repair: bool,
    /// A stage that was blocked at plan time sends its key here once its inputs give it one.
    keyed: tokio::sync::mpsc::UnboundedSender<(usize, CacheKey)>,
}

/// Outcome of one stage task.
struct Done {
    record: StageRecord,
    manifest: Option<Manifest>,
}

pub async fn execute(
    pipeline: Arc<Pipeline>,
    store: Store,
    plan: Plan,
    opts: ExecOptions,
    reporter: Arc<dyn Reporter>,
    cancel: CancelToken,
) -> Result<(RunRecord, Option<StoreError>), StoreError> {
    let started = Utc::now();
    let run_id = opts.run_id.clone();
    let tracker = Arc::clone(&opts.tracker);
    let (keyed, mut keyed_rx) = tokio::sync::mpsc::unbounded_channel();
    crate::gc::mark_local_cache(&opts.cache_dir, &store.identity());
    let shared = Arc::new(Shared {
        pipeline: Arc::clone(&pipeline),
        store: store.clone(),
        reporter: Arc::clone(&reporter),
        cancel: cancel.clone(),
        work_root: opts.cache_dir.join("work").join(&run_id),
        artifact_cache: opts.cache_dir.join("artifacts"),
        run_id: run_id.clone(),
        jobs: Arc::new(Semaphore::new(opts.jobs.max(1))),
        tracker: Arc::clone(&tracker),
        experiment: opts.experiment.clone(),
        repair: opts.repair,
        keyed,
    });
    let n = pipeline.stages.len();
    let mut manifests: Vec<Option<Manifest>> =
        plan.stages.iter().map(|s| s.manifest.clone()).collect();
    let mut pending = vec![false; n];
    let mut records: Vec<StageRecord> = Vec::with_capacity(n);
    for (i, sp) in plan.stages.iter().enumerate() {
        let kind = pipeline.stages[i].kind.name();
        let mut r = StageRecord::new(&sp.stage, kind, StageStatus::NotSelected);
        r.key = sp.key.clone();
        r.artifact = sp.artifact.clone();
        match sp.status {
            Status::Cached => {
                r.status = StageStatus::Cached;
                r.produced_by = sp.manifest.as_ref().map(|m| m.producer.run_id.clone());
            }
            Status::WillRun | Status::Blocked => {
                r.status = StageStatus::Pending;
                pending[i] = true;
            }
            Status::NotSelected => {}
        }
        records.push(r);
    }
    let mut run = RunRecord {
        id: run_id.clone(),
        pipeline: pipeline.name.clone(),
        pipeline_path: pipeline.path.display().to_string(),
        pipeline_digest: pipeline.digest.clone(),
        git_commit: crate::record::git_commit(&pipeline.dir),
        host: hostname(),
        pid: std::process::id(),
        args: opts.args.clone(),
        started_at: started,
        ended_at: None,
        status: RunStatus::Running,
        stages: records.clone(),
    };
    let anything_to_do = pending.iter().any(|&p| p);
    if anything_to_do {
        store.put_run(&run_id, &run).await?;
    }
    let stop_delivery = Arc::new(tokio::sync::Notify::new());
    let delivery = tracker.spawn_delivery(Arc::clone(&stop_delivery));
    track_run_start(&shared, &run);
    let sampler = spawn_sampler(
        Arc::clone(&tracker),
        run_id.clone(),
        opts.system_metrics_every,
    );
    for r in records.iter().filter(|r| r.status == StageStatus::Cached) {
        reporter.finished(r);
        track_reused(&shared, r);
    }

    let forced: Vec<(bool, bool)> = plan.stages.iter().map(|s| (s.forced, s.replace)).collect();
    // A stage the plan found ready has the same inputs now: its key parts carry over.
    let planned: Vec<Option<crate::key::CacheKeyParts>> = plan
        .stages
        .iter()
        .map(|s| s.parts.clone().filter(|_| s.status == Status::WillRun))
        .collect();
    let mut launched = vec![false; n];
    let mut tasks: JoinSet<(usize, Done)> = JoinSet::new();
    // Which stage each task runs, for a task that panics (and so returns no index).
    let mut task_stage: BTreeMap<tokio::task::Id, usize> = BTreeMap::new();
    loop {
        let mut started = false;
        for &i in &pipeline.order {
            if !pending[i] || launched[i] {
                continue;
            }
            let ups = pipeline.upstream(i);
            if ups.iter().any(|&u| manifests[u].is_none()) {
                continue;
            }
            launched[i] = true;
            let inputs: BTreeMap<String, Vec<Manifest>> = pipeline.stages[i]
                .inputs
                .iter()
                .map(|b| {
                    let ms = b
                        .stages
                        .iter()
                        .filter_map(|&u| manifests[u].clone())
                        .collect();
                    (b.name.clone(), ms)
                })
                .collect();
            let digests: Vec<Option<String>> = manifests
                .iter()
                .map(|m| m.as_ref().map(|m| m.digest.clone()))
                .collect();
            let sh = Arc::clone(&shared);
            let (force, replace) = forced[i];
            let parts = planned[i].clone();
            let task = tasks.spawn(async move {
                let done = run_stage(&sh, i, inputs, digests, parts, force, replace).await;
                (i, done)
            });
            task_stage.insert(task.id(), i);
            // (It may wait for a --jobs slot or another run's lock: under way, all the same.)
            records[i].status = StageStatus::Running;
            records[i].started_at = Some(Utc::now());
            started = true;
        }
        // `show` of this run, meanwhile, says which stages are at work.
        if started && anything_to_do {
            run.stages = records.clone();
            let _ = store.put_run(&run_id, &run).await;
        }
        let joined = tokio::select! {
            Some((i, key)) = keyed_rx.recv() => {
                // The record names what the stage is producing while it runs: a killed
                // run's record then tells gc whose checkpoints it may resume, and `show`
                // what it was doing.
                records[i].key = Some(key);
                run.stages = records.clone();
                let _ = store.put_run(&run_id, &run).await;
                continue;
            }
            joined = tasks.join_next() => joined,
        };
        let Some(joined) = joined else {
            break;
        };
        let (i, done) = match joined {
            Ok(x) => x,
            Err(e) => {
                // A panic in the engine's part of a stage (the stage's own work runs apart,
                // and its panic is that stage's failure) is a bug: the stage failed, the
                // others go on, and the run fails rather than passing with it skipped.
                let Some(&i) = task_stage.get(&e.id()) else {
                    continue;
                };
                let stage = &pipeline.stages[i];
                let mut record =
                    StageRecord::new(&stage.name, stage.kind.name(), StageStatus::Failed);
                record.error = Some(format!(
                    "internal error (a bug in orchestrate, please report it): {}",
                    panic_message(e)
                ));
                let uid = stage_uid(&shared.run_id, &stage.name);
                shared
                    .tracker
                    .end_run(&uid, mlflow_status(StageStatus::Failed));
                (
                    i,
                    Done {
                        record,
                        manifest: None,
                    },
                )
            }
        };
        pending[i] = false;
        manifests[i] = done.manifest;
        records[i] = done.record;
        reporter.finished(&records[i]);
        if records[i].status == StageStatus::Cached {
            track_reused(&shared, &records[i]);
        }
        // Whatever it ended as (found stored meanwhile, too): the record said `running`.
        run.stages = records.clone();
        let _ = store.put_run(&run_id, &run).await;
    }
    // Whatever is still pending never got its inputs.
    for i in 0..n {
        if pending[i] {
            let failed: Vec<String> = pipeline
                .upstream(i)
                .into_iter()
                .filter(|&u| manifests[u].is_none())
                .map(|u| format!("`{}`", pipeline.stages[u].name))
                .collect();
            records[i].status = if cancel.is_cancelled() {
                StageStatus::Cancelled
            } else {
                StageStatus::Skipped
            };
            records[i].error = Some(format!(
                "not run: upstream {} did not complete",
                failed.join(", ")
            ));
            reporter.finished(&records[i]);
        }
    }
    run.stages = records;
    run.ended_at = Some(Utc::now());
    // An interrupt is what the run ended on, whatever failed before it (exit 130, as the
    // user asked; the failed stages say so in the record).
    run.status = if cancel.is_cancelled() {
        RunStatus::Cancelled
    } else if run.stages.iter().any(|s| s.status == StageStatus::Failed) {
        RunStatus::Failed
    } else if run
        .stages
        .iter()
        .any(|s| s.status == StageStatus::Cancelled)
    {
        RunStatus::Cancelled
    } else {
        RunStatus::Succeeded
    };
    // A store that failed mid-run may still be down: the summary is shown all the same.
    let record_error = store.put_run(&run_id, &run).await.err();
    if run.status == RunStatus::Succeeded {
        let _ = orchestrate_stage::remove_tree(&shared.work_root);
    }
    sampler.abort();
    track_run_end(&shared, &run, &opts.cache_dir);
    stop_delivery.notify_one();
    let deliver = async {
        let _ = delivery.await;
        tracker.finish().await
    };
    // Interrupted, the run does not wait long on the tracking server (an upload may take
    // minutes, and a container's grace period is short): what is left stays in the spool.
    let d = if shared.cancel.is_cancelled() {
        match tokio::time::timeout(DELIVERY_AFTER_INTERRUPT, deliver).await {
            Ok(d) => d,
            Err(_) => crate::tracking::Delivery {
                problem: Some(format!(
                    "delivery cut short after {} s by the interruption",
                    DELIVERY_AFTER_INTERRUPT.as_secs()
                )),
                ..Default::default()
            },
        }
    } else {
        deliver.await
    };
    if let Some(problem) = d.problem {
        let counts = match d.records {
            0 => String::new(),
            n => format!("{} of {n} records delivered, ", d.delivered),
        };
        reporter.note(&format!(
            "tracking: {problem}; {counts}the rest wait in {} for `orchestrate sync`",
            opts.cache_dir.join("spool").display()
        ));
    }
    Ok((run, record_error))
}

fn mlflow_status(s: StageStatus) -> &'static str {
    match s {
        StageStatus::Ran | StageStatus::Cached => "FINISHED",
        StageStatus::Cancelled => "KILLED",
        _ => "FAILED",
    }
}

fn stage_uid(run_id: &str, stage: &str) -> String {
    format!("{run_id}/{stage}")
}

/// The parent MLflow run: the pipeline's params, flattened (`model.lr`), and where it came from.
fn track_run_start(sh: &Shared, run: &RunRecord) {
    let mut tags = BTreeMap::new();
    tags.insert("orchestrate.run_id".to_string(), run.id.clone());
    tags.insert("orchestrate.pipeline".to_string(), run.pipeline.clone());
    tags.insert(
        "orchestrate.pipeline_digest".to_string(),
        run.pipeline_digest.clone(),
    );
    tags.insert("mlflow.source.name".to_string(), run.pipeline_path.clone());
    if let Some(c) = &run.git_commit {
        tags.insert("mlflow.source.git.commit".to_string(), c.clone());
    }
    sh.tracker
        .start_run(&run.id, None, &sh.experiment, &run.id, tags);
    let mut params = BTreeMap::new();
    flatten_params("params", &sh.pipeline.params, &mut params);
    for s in &sh.pipeline.stages {
        flatten_params(&s.name, &s.params, &mut params);
    }
    sh.tracker.log(&run.id, params, BTreeMap::new());
}

fn stage_tags(r: &StageRecord) -> BTreeMap<String, String> {
    let mut tags = BTreeMap::new();
    tags.insert("orchestrate.stage".to_string(), r.stage.clone());
    tags.insert("orchestrate.kind".to_string(), r.kind.clone());
    tags.insert(
        "orchestrate.status".to_string(),
        r.status.as_str().to_string(),
    );
    if let Some(k) = &r.key {
        tags.insert("orchestrate.cache_key".to_string(), k.0.clone());
    }
    if let Some(a) = &r.artifact {
        tags.insert("orchestrate.artifact".to_string(), a.clone());
    }
    if let Some(e) = &r.error {
        // (Cut to MLflow's length by the tracker, after any secret in it is hidden.)
        tags.insert("orchestrate.error".to_string(), e.clone());
    }
    tags
}

/// A child run for a stage whose artifact was reused, naming the run that produced it.
fn track_reused(sh: &Shared, r: &StageRecord) {
    let uid = stage_uid(&sh.run_id, &r.stage);
    let mut tags = stage_tags(r);
    tags.insert("orchestrate.reused".to_string(), "true".to_string());
    if let Some(p) = &r.produced_by {
        tags.insert("orchestrate.produced_by".to_string(), p.clone());
    }
    sh.tracker
        .start_run(&uid, Some(&sh.run_id), &sh.experiment, &r.stage, tags);
    if let Some(i) = sh.pipeline.stage_index(&r.stage) {
        let mut params = BTreeMap::new();
        flatten_params("", &sh.pipeline.stages[i].params, &mut params);
        sh.tracker.log(&uid, params, BTreeMap::new());
    }
    sh.tracker.end_run(&uid, "FINISHED");
}

fn track_run_end(sh: &Shared, run: &RunRecord, cache_dir: &Path) {
    let record = cache_dir.join("work").join(format!("{}.json", run.id));
    // The command line and the stages' errors may hold a secret (`--set ...TOKEN=...`).
    let text = sh
        .tracker
        .hide_secrets(&serde_json::to_string_pretty(run).unwrap_or_default());
    if std::fs::create_dir_all(cache_dir.join("work")).is_ok()
        && std::fs::write(&record, text).is_ok()
    {
        sh.tracker.artifact(&run.id, &record, "run.json");
        let _ = std::fs::remove_file(&record);
    }
    let status = match run.status {
        RunStatus::Succeeded => "FINISHED",
        RunStatus::Cancelled => "KILLED",
        _ => "FAILED",
    };
    sh.tracker.end_run(&run.id, status);
}

/// Host (and GPU) metrics on the parent run while the pipeline runs.
fn spawn_sampler(
    tracker: Arc<Tracker>,
    run_id: String,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut sampler = SystemSampler::new();
        let mut step = 0;
        loop {
            tokio::time::sleep(every).await;
            for (name, value) in sampler.sample() {
                tracker.metric(&run_id, &name, value, step);
            }
            step += 1;
        }
    })
}

async fn run_stage(
    sh: &Shared,
    i: usize,
    inputs: BTreeMap<String, Vec<Manifest>>,
    digests: Vec<Option<String>>,
    planned: Option<crate::key::CacheKeyParts>,
    forced: bool,
    replace: bool,
) -> Done {
    let stage = &sh.pipeline.stages[i];
    let mut record = StageRecord::new(&stage.name, stage.kind.name(), StageStatus::Failed);
    // Held while the stage works; given back while it waits on another run's lock (see
    // `acquire`).
    let mut permit = Some(job_slot(sh).await);
    let t0 = Instant::now();
    record.started_at = Some(Utc::now());
    let finish = |mut record: StageRecord, manifest: Option<Manifest>| {
        record.ended_at = Some(Utc::now());
        record.duration_ms = t0.elapsed().as_millis() as u64;
        Done { record, manifest }
    };
    if sh.cancel.is_cancelled() {
        record.status = StageStatus::Cancelled;
        return finish(record, None);
    }
    let planned_key_unknown = planned.is_none();
    let computed = match planned {
        Some(p) => Ok(p),
        None => key_parts(&sh.pipeline, i, |u| digests[u].clone()).await,
    };
    let parts = match computed {
        Ok(p) => p,
        Err(e) => {
            // As at plan time: a source or store that could not be read is the store's kind
            // of failure (exit 3), not the stage's.
            record.store_error = matches!(
                e,
                crate::plan::PlanError::SourceUnreachable { .. } | crate::plan::PlanError::Store(_)
            );
            record.error = Some(e.to_string());
            return finish(record, None);
        }
    };
    let key = parts.key();
    record.key = Some(key.clone());
    if planned_key_unknown {
        let _ = sh.keyed.send((i, key.clone()));
    }
    let stored = |r: &mut StageRecord, m: &Manifest| {
        r.status = StageStatus::Cached;
        r.artifact = Some(m.digest.clone());
        r.produced_by = Some(m.producer.run_id.clone());
    };
    // An upstream rerun that reproduced its old digest leaves this key stored: early cut-off.
    if !forced {
        match sh.store.manifest(&key).await {
            Ok(Some(m)) => {
                stored(&mut record, &m);
                return finish(record, Some(m));
            }
            Ok(None) => {}
            Err(e) if e.is_damage() && sh.repair => {
                sh.reporter.note(&format!(
                    "stage `{}`: its stored manifest is damaged and is set aside ({e}); the stage runs",
                    stage.name
                ));
                if let Err(e) = sh.store.delete_manifest(&key).await {
                    record.error = Some(e.to_string());
                    record.store_error = true;
                    return finish(record, None);
                }
            }
            Err(e) => {
                record.error = Some(if e.is_damage() {
                    format!("{e}; run again with --repair to set it aside and rerun the stage")
                } else {
                    e.to_string()
                });
                record.store_error = true;
                return finish(record, None);
            }
        }
    }
    sh.reporter.started(&stage.name, stage.kind.name());
    let lock = LockInfo {
        run_id: sh.run_id.clone(),
        stage: stage.name.clone(),
        host: hostname(),
        pid: std::process::id(),
        pid_ns: crate::store::pid_namespace(),
        boot_id: crate::store::boot_id(),
        expires_at: unix_now() + lock_lease().as_secs(),
    };
    match acquire(sh, &key, &lock, forced, &mut permit).await {
        Ok(Acquired::Lock) => {}
        Ok(Acquired::ProducedElsewhere(m)) => {
            stored(&mut record, &m);
            return finish(record, Some(*m));
        }
        Ok(Acquired::Cancelled) => {
            record.status = StageStatus::Cancelled;
            return finish(record, None);
        }
        Err(e) => {
            record.error = Some(e.to_string());
            record.store_error = true;
            return finish(record, None);
        }
    }
    let uid = stage_uid(&sh.run_id, &stage.name);
    {
        let mut tags = BTreeMap::new();
        tags.insert("orchestrate.stage".to_string(), stage.name.clone());
        tags.insert(
            "orchestrate.kind".to_string(),
            stage.kind.name().to_string(),
        );
        tags.insert("orchestrate.cache_key".to_string(), key.0.clone());
        for (name, digests) in &parts.inputs {
            tags.insert(format!("orchestrate.input.{name}"), digests.join(","));
        }
        sh.tracker
            .start_run(&uid, Some(&sh.run_id), &sh.experiment, &stage.name, tags);
        let mut params = BTreeMap::new();
        flatten_params("", &stage.params, &mut params);
        sh.tracker.log(&uid, params, BTreeMap::new());
    }
    // Stopped between renewals, not in one: a renewal cut off mid-write (on `file://` the
    // write goes on in a blocking thread) could land after the release below, and bring the
    // lock back with a fresh lease for waiters to wait out.
    let stop_heartbeat = Arc::new(tokio::sync::Notify::new());
    let mut heartbeat = {
        let store = sh.store.clone();
        let key = key.clone();
        let mut lock = lock.clone();
        let stop = Arc::clone(&stop_heartbeat);
        AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.notified() => break,
                    _ = tokio::time::sleep(LOCK_RENEW) => {}
                }
                lock.expires_at = unix_now() + lock_lease().as_secs();
                if let Ok(false) = store.renew_lock(&key, &lock).await {
                    break; // taken over: renewing would take it back from its holder
                }
            }
        }))
    };
    let metrics = Arc::new(Mutex::new(StageMetrics::default()));
    let mut attempt = 0;
    // The failure a retry was waiting on when the run was cancelled, for the record.
    let mut cancelled_after: Option<String> = None;
    let result = loop {
        attempt += 1;
        let r = produce(sh, i, &inputs, &key, &parts, attempt, &metrics, replace).await;
        match r {
            Err(StageFailure::Failed(msg) | StageFailure::Store(msg))
                if attempt <= stage.retries && !sh.cancel.is_cancelled() =>
            {
                let wait = retry_wait(attempt);
                sh.reporter.note(&format!(
                    "stage `{}` failed (attempt {attempt} of {}), retrying in {:.1}s: {}",
                    stage.name,
                    stage.retries + 1,
                    wait.as_secs_f64(),
                    msg.lines().next().unwrap_or("")
                ));
                if !sleep_unless_cancelled(wait, &sh.cancel).await {
                    cancelled_after = Some(msg);
                    break Err(StageFailure::Cancelled);
                }
            }
            other => break other,
        }
    };
    stop_heartbeat.notify_one();
    // (A renewal stuck on an unreachable store is cut off after a while: the release below
    // fails alike then, and the lease runs out.)
    let _ = tokio::time::timeout(Duration::from_secs(30), &mut heartbeat.0).await;
    drop(heartbeat);
    sh.store.release_lock(&key, &lock).await;
    record.attempts = attempt;
    record.metrics = metrics.lock().map(|m| m.latest.clone()).unwrap_or_default();
    let (record, manifest) = match result {
        Ok(m) => {
            record.status = StageStatus::Ran;
            record.artifact = Some(m.digest.clone());
            (record, Some(m))
        }
        Err(StageFailure::Cancelled) => {
            record.status = StageStatus::Cancelled;
            record.error =
                cancelled_after.map(|msg| format!("cancelled while waiting to retry after: {msg}"));
            (record, None)
        }
        Err(StageFailure::Failed(msg) | StageFailure::Gate(msg) | StageFailure::Changed(msg)) => {
            record.error = Some(msg);
            (record, None)
        }
        Err(StageFailure::Store(msg) | StageFailure::Storing(msg)) => {
            record.error = Some(msg);
            record.store_error = true;
            (record, None)
        }
    };
    sh.tracker.log(&uid, BTreeMap::new(), stage_tags(&record));
    sh.tracker.end_run(&uid, mlflow_status(record.status));
    finish(record, manifest)
}

enum Acquired {
    Lock,
    ProducedElsewhere(Box<Manifest>),
    Cancelled,
}

/// One of the `--jobs` slots.
async fn job_slot(sh: &Shared) -> tokio::sync::OwnedSemaphorePermit {
    Arc::clone(&sh.jobs)
        .acquire_owned()
        .await
        .expect("the semaphore is never closed")
}

/// Takes the stage's lock, or waits while another run holds it and uses what it commits.
/// While it waits, its `--jobs` slot (`permit`) goes to stages that can work (with
/// `--jobs 1`, one stage waiting on another run's training held up every other stage), and
/// it looks again less and less often, up to every [`LOCK_POLL_MOST`] (a poll is three
/// requests to the store, for as long as a training lasts).
async fn acquire(
    sh: &Shared,
    key: &CacheKey,
    lock: &LockInfo,
    forced: bool,
    permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<Acquired, StoreError> {
    let mut told = false;
    let mut lock = lock.clone();
    let mut poll = LOCK_POLL;
    loop {
        if permit.is_none() {
            *permit = Some(job_slot(sh).await);
        }
        // The lease runs from when the lock is taken, not from when waiting began: a lock
        // written already expired would be taken over by the next waiter at once.
        lock.expires_at = unix_now() + lock_lease().as_secs();
        let lock = &lock;
        match sh.store.try_lock(key, lock).await? {
            LockAttempt::Acquired => {
                // The previous holder may have committed just before releasing.
                if !forced {
                    // Released on every way out: a read that failed here left the lock held
                    // for a lease, every waiter on it waiting that long.
                    match sh.store.manifest(key).await {
                        Ok(None) => {}
                        Ok(Some(m)) => {
                            sh.store.release_lock(key, lock).await;
                            return Ok(Acquired::ProducedElsewhere(Box::new(m)));
                        }
                        Err(e) => {
                            sh.store.release_lock(key, lock).await;
                            return Err(e);
                        }
                    }
                }
                return Ok(Acquired::Lock);
            }
            LockAttempt::HeldBy(holder) => {
                if !told {
                    sh.reporter.note(&format!(
                        "stage `{}`: waiting for run {} (pid {} on {}), which is producing the same artifact",
                        lock.stage, holder.run_id, holder.pid, holder.host
                    ));
                    told = true;
                }
                *permit = None;
                if !sleep_unless_cancelled(poll, &sh.cancel).await {
                    return Ok(Acquired::Cancelled);
                }
                poll = (poll * 3 / 2).min(LOCK_POLL_MOST);
                if !forced {
                    if let Some(m) = sh.store.manifest(key).await? {
                        return Ok(Acquired::ProducedElsewhere(Box::new(m)));
                    }
                }
            }
        }
    }
}

enum StageFailure {
    Cancelled,
    Failed(String),
    /// The artifact store failed the stage (reading its inputs, storing its output).
    Store(String),
    /// Storing the finished output failed, after its own retries: not worth redoing the work.
    Storing(String),
    /// A quality gate rejected the result. Never retried: a perplexity fails again, and a
    /// latency measured until it happens to pass is not a gate.
    Gate(String),
    /// A file the cache key names changed while the stage ran. Not retried: the key was
    /// computed from the old bytes, and a retry would be stored under it again.
    Changed(String),
}

/// The `deps` (and ingest sources) of stage `i` whose content is no longer what `parts`
/// hashed, backticked, and the files its folders and globs name now that they did not when
/// the pipeline was read (the stage read those too, and the key does not name them); an
/// error where one cannot be read again.
async fn files_changed_since(
    sh: &Shared,
    i: usize,
    parts: &crate::key::CacheKeyParts,
) -> Result<Vec<String>, crate::plan::PlanError> {
    if parts.files.is_empty() {
        return Ok(Vec::new());
    }
    let now = crate::plan::dependency_digests(&sh.pipeline, i).await?;
    let mut changed: Vec<String> = parts
        .files
        .iter()
        .filter(|(name, digest)| now.get(*name) != Some(*digest))
        .map(|(name, _)| format!("`{name}`"))
        .collect();
    let s = &sh.pipeline.stages[i];
    if let Ok(listed) = (s.kind.descriptor().file_deps)(&s.params, &sh.pipeline.dir) {
        let new = listed.into_iter().filter(|f| !s.deps.contains(f));
        changed.extend(new.map(|f| format!("`{f}` (new)")));
    }
    Ok(changed)
}

impl From<StoreError> for StageFailure {
    fn from(e: StoreError) -> Self {
        StageFailure::Store(e.to_string())
    }
}

/// Says that `what` failed on try `tries` of `stage` and waits before the next: whether the
/// whole wait passed (not cut short by a cancellation).
async fn wait_to_retry(
    sh: &Shared,
    stage: &crate::pipeline::Stage,
    what: &str,
    tries: u32,
    e: &str,
) -> bool {
    let wait = retry_wait(tries);
    sh.reporter.note(&format!(
        "stage `{}`: {what} failed (try {tries} of {}), retrying in {:.1}s: {e}",
        stage.name,
        stage.retries + 1,
        wait.as_secs_f64(),
    ));
    sleep_unless_cancelled(wait, &sh.cancel).await
}

/// Waits `wait`, unless the run is cancelled first (a retry's backoff reaches 32 s, and
/// Ctrl-C must not wait for it): whether the whole wait passed.
async fn sleep_unless_cancelled(wait: Duration, cancel: &CancelToken) -> bool {
    let until = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < until {
        if cancel.is_cancelled() {
            return false;
        }
        let left = until - tokio::time::Instant::now();
        tokio::time::sleep(left.min(Duration::from_millis(100))).await;
    }
    !cancel.is_cancelled()
}

/// A task that ends when its handle does, however the holder ends: a stage's lock is
/// renewed only while its stage task lives, so that a panic in that task leaves the lock
/// to expire rather than renewed until the process exits.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a task that ended without finishing said.
fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string())
}

/// How long to wait before retry `attempt` + 1: 0.5 s, doubling, at most 32 s.
fn retry_wait(attempt: u32) -> Duration {
    Duration::from_millis(500 * (1 << (attempt.max(1) - 1).min(6)))
}

/// One attempt: materialise inputs, do the work, upload, commit (over what the key holds
/// when `replace`).
#[allow(clippy::too_many_arguments)]
async fn produce(
    sh: &Shared,
    i: usize,
    inputs: &BTreeMap<String, Vec<Manifest>>,
    key: &CacheKey,
    parts: &crate::key::CacheKeyParts,
    attempt: u32,
    metrics: &Arc<Mutex<StageMetrics>>,
    replace: bool,
) -> Result<Manifest, StageFailure> {
    let stage = &sh.pipeline.stages[i];
    let t0 = Instant::now();
    let work = sh.work_root.join(format!("{}-{attempt}", stage.name));
    let out = work.join("out");
    let scratch = work.join("scratch");
    for d in [&out, &scratch] {
        std::fs::create_dir_all(d)
            .map_err(|e| StageFailure::Failed(format!("cannot create {}: {e}", d.display())))?;
    }
    let mut bound: BTreeMap<String, Vec<InputArtifact>> = BTreeMap::new();
    // Each input's folder, shared with the other stages that read it, as the stage is given
    // it: checked again once it has run.
    let mut given: Vec<(&str, PathBuf, &Manifest, String)> = Vec::new();
    for (name, ms) in inputs {
        let binding = stage.inputs.iter().find(|b| &b.name == name);
        let mut v = Vec::new();
        for (j, m) in ms.iter().enumerate() {
            let (dir, stamp) = materialize(sh, m).await?;
            given.push((name, dir.clone(), m, stamp));
            // This pipeline's name for the producer: a manifest holds the name of whichever
            // stage (in whichever pipeline) first produced the artifact.
            let producer = binding
                .and_then(|b| b.stages.get(j))
                .map(|&u| sh.pipeline.stages[u].name.clone())
                .unwrap_or_else(|| m.stage.clone());
            v.push(InputArtifact {
                stage: producer,
                kind: m.kind,
                dir,
                digest: m.digest.clone(),
                metadata: serde_json::Value::Object(m.metadata.clone()),
            });
        }
        bound.insert(name.clone(), v);
    }

    let token = sh.cancel.child();
    let timed_out = Arc::new(AtomicBool::new(false));
    let timer = stage.timeout.map(|limit| {
        let token = token.clone();
        let flag = Arc::clone(&timed_out);
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            // A stage Ctrl-C already stops is cancelled, not timed out.
            if !token.is_cancelled() {
                flag.store(true, Ordering::SeqCst);
                token.cancel();
            }
        })
    });
    let sink = Sink {
        stage: stage.name.clone(),
        reporter: Arc::clone(&sh.reporter),
        metrics: Arc::clone(metrics),
        tracker: Arc::clone(&sh.tracker),
        uid: stage_uid(&sh.run_id, &stage.name),
    };
    let kind = stage.kind;
    let params = stage.params.clone();
    let device = stage.device.resolve();
    let name = stage.name.clone();
    let pipeline_dir = sh.pipeline.dir.clone();
    let (out2, scratch2) = (out.clone(), scratch.clone());
    let checkpoint_store_failed = Arc::new(AtomicBool::new(false));
    let checkpoints = StoreCheckpoints {
        store: sh.store.clone(),
        key: key.clone(),
        dir: work.join("checkpoints"),
        runtime: tokio::runtime::Handle::current(),
        reporter: Arc::clone(&sh.reporter),
        stage: stage.name.clone(),
        store_failed: Arc::clone(&checkpoint_store_failed),
    };
    let result = tokio::task::spawn_blocking(move || {
        let ctx = StageContext {
            stage: &name,
            params: &params,
            inputs: &bound,
            out_dir: &out2,
            scratch_dir: &scratch2,
            pipeline_dir: &pipeline_dir,
            device: &device,
            events: &sink,
            cancel: &token,
            checkpoints: &checkpoints,
        };
        let output = kind.run(&ctx);
        // The stage's large buffers will not come back: return them to the system rather
        // than hold them while later stages run or the process idles.
        orchestrate_alloc::release_cache();
        output
    })
    .await;
    if let Some(t) = timer {
        t.abort();
    }
    let output = match result {
        Ok(Ok(o)) => o,
        Ok(Err(StageError::Cancelled)) if timed_out.load(Ordering::SeqCst) => {
            let limit = stage.timeout.unwrap_or_default();
            return Err(StageFailure::Failed(format!(
                "timed out after {}",
                crate::report::fmt_ms(limit.as_millis() as u64)
            )));
        }
        Ok(Err(StageError::Cancelled)) => return Err(StageFailure::Cancelled),
        Ok(Err(e @ StageError::Gate(_))) => {
            return Err(StageFailure::Gate(format!(
                "{e} (working directory kept at {})",
                work.display()
            )));
        }
        Ok(Err(e)) => {
            let msg = format!("{e} (working directory kept at {})", work.display());
            return Err(if checkpoint_store_failed.load(Ordering::SeqCst) {
                StageFailure::Store(msg)
            } else {
                StageFailure::Failed(msg)
            });
        }
        Err(join) => return Err(StageFailure::Failed(format!("the stage crashed: {join}"))),
    };
    // A stage that returned its output finished its work, even where Ctrl-C came as it did
    // (a stage stopped short says `Cancelled`): it is stored, as finished stages are, and not
    // thrown away to be redone. Storing does not wait on anything a cancellation ends.
    // The files the key names were hashed when the stage was planned, and the stage read
    // them since (perhaps long after, behind a `--jobs` queue): an output made from other
    // bytes must not be stored under that key, where a later run would take it as theirs.
    // Checked again on a failure to read them (a remote source's listing), as storing is
    // retried: a retry of the stage would redo its work.
    let mut tries = 0;
    let changed = loop {
        tries += 1;
        match files_changed_since(sh, i, parts).await {
            Ok(changed) => break changed,
            // A file gone or unreadable has changed, as far as the key can tell.
            Err(e @ crate::plan::PlanError::Dependency { .. }) => break vec![e.to_string()],
            Err(e) if tries <= stage.retries && !sh.cancel.is_cancelled() => {
                if !wait_to_retry(sh, stage, "checking its inputs", tries, &e.to_string()).await {
                    return Err(StageFailure::Cancelled);
                }
            }
            // Not known to have changed: the store's (or the source's) failure, after the
            // stage's retries; the work is not redone for it.
            Err(e) => {
                return Err(StageFailure::Storing(format!(
                    "cannot check that the files stage `{}` read did not change while it ran: {e} (working directory kept at {})",
                    stage.name,
                    work.display()
                )))
            }
        }
    };
    if !changed.is_empty() {
        return Err(StageFailure::Changed(format!(
            "{} changed while stage `{}` ran, so its output may not be what its cache key names; nothing was stored: run it again (working directory kept at {})",
            changed.join(", "),
            stage.name,
            work.display()
        )));
    }

    // A stage that wrote into an input (a shell command can) changed it for every stage
    // reading it at the same time (`--jobs`), whose outputs would then be stored under a key
    // naming the stored bytes, and its own output is not made from them either.
    let changed = inputs_changed_since(&given);
    if !changed.is_empty() {
        return Err(StageFailure::Changed(format!(
            "input {} changed while stage `{}` ran: a stage wrote into it (this one, or one reading it beside it); stages must not write into their inputs (copy what they change to $OUT or $SCRATCH); nothing was stored: run it again (working directory kept at {})",
            changed.join(", "),
            stage.name,
            work.display()
        )));
    }

    let files =
        list_files(&out).map_err(|e| StageFailure::Failed(format!("cannot list outputs: {e}")))?;
    let store = &sh.store;
    // Storing is retried on its own (`retries`): the work is done, and redoing it (a whole
    // training, a shell command's side effects) because an upload failed would be wrong.
    let mut tries = 0;
    let Stored {
        manifest,
        committed,
        replaced,
    } = loop {
        tries += 1;
        let stored = store_output(
            sh,
            i,
            &out,
            &files,
            key,
            parts,
            &output.metadata,
            t0,
            replace,
        );
        match stored.await {
            Ok(stored) => break stored,
            Err(e) if tries <= stage.retries && !sh.cancel.is_cancelled() => {
                if !wait_to_retry(sh, stage, "storing its output", tries, &e.to_string()).await {
                    return Err(StageFailure::Cancelled);
                }
            }
            Err(e) => return Err(StageFailure::Storing(e.to_string())),
        }
    };
    let uid = stage_uid(&sh.run_id, &stage.name);
    let _ = store.drop_checkpoints(key).await;
    if let Some(old) = replaced {
        sh.reporter.note(&format!(
            "stage `{}` is not deterministic: this run produced {} where the store held {} for the same key; --force replaced it",
            stage.name,
            crate::plan::short_digest(&manifest.digest),
            crate::plan::short_digest(&old.digest)
        ));
    }
    if committed.digest != manifest.digest {
        // Under --force only a pin keeps the stored one: say so, not to use --force.
        let how = if replace {
            format!(
                "it is pinned (`orchestrate unpin {}` lets `--force {}` replace it)",
                key.0, stage.name
            )
        } else {
            format!("`--force {}` replaces it, unless it is pinned", stage.name)
        };
        sh.reporter.note(&format!(
            "stage `{}` is not deterministic: this run produced {}, but the store already holds {} for the same key; keeping the stored one: {how}",
            stage.name,
            crate::plan::short_digest(&manifest.digest),
            crate::plan::short_digest(&committed.digest),
        ));
    }
    // MLflow is shown the files the store keeps. When another run committed this key first
    // (a stage that is not deterministic), those are its files, not this run's.
    let kept = if committed.digest == manifest.digest {
        Some(out.clone())
    } else {
        materialize(sh, &committed).await.ok().map(|(dir, _)| dir)
    };
    // Copying files into the tracking spool (a model of hundreds of MB) and removing the
    // working folder run off the async threads, which other stages' requests need.
    let tracker = Arc::clone(&sh.tracker);
    let tracked = stage.kind.descriptor().tracked_files;
    let register = sh
        .pipeline
        .tracking
        .register
        .as_ref()
        .filter(|r| r.stage == stage.name)
        .map(|r| (r.name.clone(), model_card(&sh.pipeline, stage, &committed)));
    let files: Vec<String> = committed.files.iter().map(|f| f.path.clone()).collect();
    let tidy = tokio::task::spawn_blocking(move || {
        if let Some(kept) = kept {
            for name in tracked {
                let path = kept.join(name);
                if path.is_file() {
                    tracker.artifact(&uid, &path, name);
                }
            }
            if let Some((name, card_text)) = register {
                // The whole artifact goes up under `model/`, and a new version points at it,
                // once every file is on its way: a version missing its weights would be
                // served from the registry and fail there (the spool keeps why).
                let mut whole = true;
                for f in &files {
                    let path = kept.join(f);
                    whole &= path.is_file() && tracker.artifact(&uid, &path, &format!("model/{f}"));
                }
                let card = work.join("MODEL_CARD.md");
                if std::fs::write(&card, card_text).is_ok() {
                    tracker.artifact(&uid, &card, "model/MODEL_CARD.md");
                }
                if whole {
                    tracker.register_model(&uid, &name, "model");
                }
            }
        }
        let _ = orchestrate_stage::remove_tree(&work);
    });
    let _ = tidy.await;
    Ok(committed)
}

/// What storing a stage's output did.
struct Stored {
    /// This run's output.
    manifest: Manifest,
    /// What the store now holds under the key: this run's, or one another run committed
    /// first.
    committed: Manifest,
    /// Under `--force`, a different output this run's replaced.
    replaced: Option<Manifest>,
}

/// Uploads a finished stage's output files and commits its manifest. Returns ours and the
/// one the store keeps (another run's, if it committed this key first).
#[allow(clippy::too_many_arguments)]
async fn store_output(
    sh: &Shared,
    i: usize,
    out: &Path,
    files: &[String],
    key: &CacheKey,
    parts: &crate::key::CacheKeyParts,
    metadata: &serde_json::Map<String, serde_json::Value>,
    t0: Instant,
    replace: bool,
) -> Result<Stored, StoreError> {
    let stage = &sh.pipeline.stages[i];
    let store = &sh.store;
    let uploads: Vec<(PathBuf, String)> = files.iter().map(|r| (out.join(r), r.clone())).collect();
    let mut entries: Vec<FileEntry> = futures::stream::iter(
        uploads
            .into_iter()
            .map(|(path, rel)| async move { store.put_file(&path, &rel).await }),
    )
    .buffer_unordered(UPLOADS)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect::<Result<_, _>>()?;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let kind = stage.kind.descriptor().output;
    let manifest = Manifest {
        format: 1,
        key: key.clone(),
        kind,
        pipeline: sh.pipeline.name.clone(),
        stage: stage.name.clone(),
        digest: Manifest::content_digest(kind, &entries),
        files: entries,
        metadata: metadata.clone(),
        producer: Producer {
            run_id: sh.run_id.clone(),
            host: hostname(),
            created_at: Utc::now().to_rfc3339(),
            duration_ms: t0.elapsed().as_millis() as u64,
        },
        key_parts: parts.clone(),
    };
    // A pinned artifact is kept as it is: its pin, and the runs that name its digest, mean
    // that content (replaced, its blobs would be unreferenced and go at the next gc).
    if replace && !store.pins().await?.contains(key) {
        let previous = store.commit_replacing(&manifest).await?;
        store.put_back_missing(&manifest.files, out).await?;
        return Ok(Stored {
            replaced: previous.filter(|p| p.digest != manifest.digest),
            committed: manifest.clone(),
            manifest,
        });
    }
    let committed = store.commit(&manifest).await?;
    // A blob this upload found already stored was not refreshed, and `gc` may have taken
    // it, unreferenced, before the manifest naming it landed: put back any that is gone.
    if committed.digest == manifest.digest {
        store.put_back_missing(&manifest.files, out).await?;
    }
    Ok(Stored {
        manifest,
        committed,
        replaced: None,
    })
}

/// A short model card for a registered model: where it came from and what it measured.
fn model_card(p: &Pipeline, stage: &crate::pipeline::Stage, m: &Manifest) -> String {
    let mut card = format!(
        "# {} / {}\n\nProduced by stage `{}` (kind `{}`) of pipeline `{}` in run `{}`.\n\n",
        p.name,
        stage.name,
        stage.name,
        stage.kind.name(),
        p.name,
        m.producer.run_id
    );
    card.push_str(&format!(
        "- artifact digest: `{}`\n- cache key: `{}`\n",
        m.digest, m.key
    ));
    for (name, digests) in &m.key_parts.inputs {
        card.push_str(&format!("- input `{name}`: `{}`\n", digests.join("`, `")));
    }
    card.push_str("\n## Parameters\n\n```json\n");
    card.push_str(&serde_json::to_string_pretty(&stage.params).unwrap_or_default());
    card.push_str("\n```\n\n## Results\n\n```json\n");
    card.push_str(&serde_json::to_string_pretty(&m.metadata).unwrap_or_default());
    card.push_str("\n```\n\nData: Debian's `fortunes` and `fortunes-ru` quotations (see the corpus artifact's statistics).\n");
    card
}

/// An artifact's files in the local cache, downloaded and verified on first use, with the
/// stamp of the folder as it was handed out. Inputs are shared between stages and runs:
/// stages must treat them as read-only (see [`materialize_stamped_in`]).
async fn materialize(sh: &Shared, m: &Manifest) -> Result<(PathBuf, String), StoreError> {
    materialize_stamped_in(&sh.store, &sh.artifact_cache, m).await
}

/// `m`'s files under `cache/<digest>/files/`, downloaded and verified unless already there.
pub async fn materialize_in(
    store: &Store,
    cache: &Path,
    m: &Manifest,
) -> Result<PathBuf, StoreError> {
    materialize_stamped_in(store, cache, m)
        .await
        .map(|(dir, _)| dir)
}

/// As [`materialize_in`], with the folder's stamp as handed out.
///
/// Beside `files/` lies `stamp`: each file's size, modification time and inode when it was
/// written. A stage that wrote into its input (a shell command can), or added a file to it,
/// changes the stamp or the list of files: the stage itself fails once it has run (its
/// inputs are checked against the stamps they were handed out with), and the next use sets
/// the folder aside and downloads the artifact again, rather than handing the changed files
/// to a stage whose key names the stored ones. One `stat` per file and a listing, not a
/// hash: reuse stays cheap. (The files are not made read-only: a `cp` of them would carry
/// the bit into outputs.)
async fn materialize_stamped_in(
    store: &Store,
    cache: &Path,
    m: &Manifest,
) -> Result<(PathBuf, String), StoreError> {
    let hex = m.digest.strip_prefix("blake3:").unwrap_or(&m.digest);
    let dir = cache.join(hex);
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = || {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", std::process::id())
    };
    let io = |context: String, e: std::io::Error| StoreError::Io { context, source: e };
    if dir.is_dir() {
        let written = std::fs::read_to_string(dir.join("stamp")).ok();
        if let Some(written) = written.filter(|w| Some(w) == stamp(&dir.join("files"), m).as_ref())
        {
            return Ok((dir.join("files"), written));
        }
        // Changed since written, or left by an older version without a stamp: set it aside
        // and download again. (A stage reading it at this moment keeps the files it has
        // open; one it opens later is gone. Only a stage that changed its input causes this.)
        let aside = cache.join(format!("{hex}.stale-{}", unique()));
        match std::fs::rename(&dir, &aside) {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&aside);
            }
            // Another stage set it aside first (it found the same change).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io(
                    format!(
                        "cannot set aside the changed cache folder {}",
                        dir.display()
                    ),
                    e,
                ))
            }
        }
    }
    let tmp = cache.join(format!("{hex}.partial-{}", unique()));
    let _ = std::fs::remove_dir_all(&tmp);
    let cannot_write = |what: &Path| format!("cannot write {}", what.display());
    std::fs::create_dir_all(tmp.join("files")).map_err(|e| io(cannot_write(&tmp), e))?;
    let what = format!("the artifact of stage `{}`", m.stage);
    for f in &m.files {
        if let Err(e) = store
            .get_file(f, &what, &tmp.join("files").join(&f.path))
            .await
        {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    }
    // Renames keep modification times and inodes, so the stamp taken here holds for `dir`.
    let stamped = match stamp(&tmp.join("files"), m) {
        Some(text) => std::fs::write(tmp.join("stamp"), &text)
            .map(|()| text)
            .map_err(|e| io(cannot_write(&tmp), e)),
        None => Err(io(
            format!(
                "cannot read back the files just written to {}",
                tmp.display()
            ),
            std::io::Error::other("a file is missing or of the wrong size"),
        )),
    };
    let ours = match stamped {
        Ok(text) => text,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another stage materialised it in the meantime (any changed folder was set aside
        // above); theirs is identical, its stamp its own.
        let _ = std::fs::remove_dir_all(&tmp);
        let theirs = std::fs::read_to_string(dir.join("stamp"))
            .map_err(|e| io(format!("cannot read {}", dir.join("stamp").display()), e))?;
        return Ok((dir.join("files"), theirs));
    }
    Ok((dir.join("files"), ours))
}

/// The inputs (name, folder given, artifact, its stamp then) whose folder no longer matches
/// the stamp it was given with: a file written, added, removed or replaced, or the folder set
/// aside and fetched again (another stage found it changed). Named for a message.
fn inputs_changed_since(given: &[(&str, PathBuf, &Manifest, String)]) -> Vec<String> {
    given
        .iter()
        .filter(|(_, dir, m, then)| stamp(dir, m).as_ref() != Some(then))
        .map(|(name, dir, ..)| format!("`{name}` ({})", dir.display()))
        .collect()
}

/// Each of `m`'s files under `files`: its size, modification time and inode, one line each.
/// `None` when one is missing, of another size, or unreadable, or when `files` holds a file
/// the manifest does not list.
fn stamp(files: &Path, m: &Manifest) -> Option<String> {
    let listed: Vec<&str> = {
        let mut v: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        v.sort_unstable();
        v
    };
    if list_files(files).ok()? != listed {
        return None;
    }
    // The first line names the stamp's format: folders stamped by an older one (whose files
    // were made read-only, or whose stamps lacked inodes) are downloaded again.
    let mut out = String::from("stamp 3\n");
    for f in &m.files {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(files.join(&f.path)).ok()?;
        let modified = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
        if meta.len() != f.size {
            return None;
        }
        // The inode too: a file replaced (`sed -i`, a fresh download) within one tick of a
        // coarse clock (1 s on some filesystems) keeps its size and time, not its inode.
        out.push_str(&format!(
            "{} {} {} {}\n",
            meta.len(),
            modified.as_nanos(),
            meta.ino(),
            f.path
        ));
    }
    Some(out)
}

/// A FIFO, a socket or a device in an output: the artifact would be stored without it.
fn not_a_file(shown: &dyn std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!(
        "`{shown}` is a FIFO, socket or device, which an artifact cannot hold: write a file there instead"
    ))
}

/// Files under `root`, relative and `/`-separated, sorted.
fn list_files(root: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&rel))? {
            let entry = entry?;
            let child = rel.join(entry.file_name());
            let ft = entry.file_type()?;
            // An artifact's file names are text (manifests are JSON, object keys UTF-8); a
            // name that is not would be stored under another, or lost.
            let Some(name) = child.to_str().map(str::to_string) else {
                return Err(std::io::Error::other(format!(
                    "`{}` has a name that is not UTF-8, which an artifact cannot hold: rename it",
                    child.display()
                )));
            };
            if ft.is_dir() {
                stack.push(child);
            } else if ft.is_file() {
                out.push(name);
            } else if ft.is_symlink() {
                // A link to a file is stored as the file. One to a folder, or to nothing,
                // cannot be: said, naming it, rather than the artifact stored without it.
                let shown = child.display();
                match std::fs::metadata(root.join(&child)) {
                    Ok(target) if target.is_file() => out.push(name),
                    // One inside the tree (a virtualenv's `lib64 -> lib`) names files the
                    // artifact holds anyway; one outside would be lost without a word.
                    Ok(target) if target.is_dir() => {
                        let inside = match (
                            std::fs::canonicalize(root.join(&child)),
                            std::fs::canonicalize(root),
                        ) {
                            (Ok(target), Ok(root)) => target.starts_with(root),
                            _ => false,
                        };
                        if !inside {
                            return Err(std::io::Error::other(format!(
                                "`{shown}` is a link to a folder outside the output, which is not stored: copy the folder there instead"
                            )));
                        }
                    }
                    Ok(_) => return Err(not_a_file(&shown)),
                    Err(e) => {
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("`{shown}` is a link to nothing readable ({e})"),
                        ))
                    }
                }
            } else {
                return Err(not_a_file(&child.display()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// How many of a stage's newest checkpoints stay in the store while it runs.
const CHECKPOINTS_KEPT: usize = 2;

/// Checkpoints in the artifact store under the cache key of the artifact being produced.
/// Stages call it from their blocking thread, hence the runtime handle.
struct StoreCheckpoints {
    store: Store,
    key: CacheKey,
    dir: PathBuf,
    runtime: tokio::runtime::Handle,
    reporter: Arc<dyn Reporter>,
    stage: String,
    /// Set when the store failed a checkpoint's save or load: the stage's failure is then
    /// the store's (exit 3), not its work's.
    store_failed: Arc<AtomicBool>,
}

impl Checkpoints for StoreCheckpoints {
    fn save(&self, step: u64, dir: &Path) -> Result<(), StageError> {
        let fail = |e: &dyn std::fmt::Display| {
            StageError::Failed(format!("cannot store checkpoint {step}: {e}"))
        };
        let files = list_files(dir).map_err(|e| fail(&e))?;
        let fail = |e: &StoreError| {
            self.store_failed.store(true, Ordering::SeqCst);
            fail(e)
        };
        self.runtime.block_on(async {
            let mut entries = Vec::new();
            for rel in files {
                entries.push(
                    self.store
                        .put_file(&dir.join(&rel), &rel)
                        .await
                        .map_err(|e| fail(&e))?,
                );
            }
            // The checkpoint's own record goes last: seen complete or not at all.
            self.store
                .put_checkpoint(&self.key, step, &entries)
                .await
                .map_err(|e| fail(&e))?;
            // Only the newest checkpoints are kept (an older one stands in for a damaged
            // newest): a `spec512` checkpoint with its optimiser state is about 580 MB, and
            // keeping every one of a 2000-step run held 5 GB until it finished. Their blobs
            // go at the next `gc`. Failing to forget one costs space, not the run.
            let steps = self.store.checkpoint_steps(&self.key).await;
            for old in steps.unwrap_or_default().into_iter().skip(CHECKPOINTS_KEPT) {
                let _ = self.store.drop_checkpoint(&self.key, old).await;
            }
            Ok(())
        })
    }

    fn latest(&self) -> Result<Option<(u64, PathBuf)>, StageError> {
        let fail = |e: &StoreError| {
            self.store_failed.store(true, Ordering::SeqCst);
            StageError::Failed(format!("cannot read the last checkpoint: {e}"))
        };
        self.runtime.block_on(async {
            // Newest first. A damaged checkpoint (a blob missing or corrupt, a record that
            // does not parse) is said, forgotten, and an older one tried: failing on it
            // would fail every rerun, for good.
            for step in self
                .store
                .checkpoint_steps(&self.key)
                .await
                .map_err(|e| fail(&e))?
            {
                match self.fetch_checkpoint(step).await {
                    Ok(Some(dest)) => {
                        self.reporter.note(&format!(
                            "stage `{}`: resuming from the checkpoint at step {step}",
                            self.stage
                        ));
                        return Ok(Some((step, dest)));
                    }
                    Ok(None) => {}
                    Err(e) if e.is_damage() => {
                        self.reporter.note(&format!(
                            "stage `{}`: the checkpoint at step {step} is damaged and is set aside ({e})",
                            self.stage
                        ));
                        self.store
                            .drop_checkpoint(&self.key, step)
                            .await
                            .map_err(|e| fail(&e))?;
                    }
                    Err(e) => return Err(fail(&e)),
                }
            }
            Ok(None)
        })
    }
}

impl StoreCheckpoints {
    /// Downloads the checkpoint at `step` into its own folder; None if it is gone.
    async fn fetch_checkpoint(&self, step: u64) -> Result<Option<PathBuf>, StoreError> {
        let Some(files) = self.store.checkpoint(&self.key, step).await? else {
            return Ok(None);
        };
        let dest = self.dir.join(format!("{step:012}"));
        let _ = std::fs::remove_dir_all(&dest);
        let what = format!("checkpoint {step} of stage `{}`", self.stage);
        for f in &files {
            self.store.get_file(f, &what, &dest.join(&f.path)).await?;
        }
        Ok(Some(dest))
    }
}

/// A stage's metrics over all its attempts (`retries`), which log into one tracking run.
#[derive(Default)]
struct StageMetrics {
    /// Each metric's last value, for the run record.
    latest: BTreeMap<String, f64>,
    /// Per metric, the lowest step not logged yet.
    next_step: BTreeMap<String, i64>,
}

impl StageMetrics {
    /// Notes `value` and says at which step to log it, if at all. A metric without a step
    /// gets 0, 1, 2, ... per name. A step already logged is not logged again: an attempt
    /// that resumed from a checkpoint repeats the steps after it, which the attempt before
    /// logged (bit for bit the same values on the CPU), and MLflow would chart both.
    fn step_for(&mut self, name: &str, value: f64, step: Option<u64>) -> Option<i64> {
        self.latest.insert(name.to_string(), value);
        let next = self.next_step.entry(name.to_string()).or_insert(0);
        let step = match step {
            Some(s) => i64::try_from(s).unwrap_or(i64::MAX),
            None => *next,
        };
        if step < *next {
            return None;
        }
        *next = step.saturating_add(1);
        Some(step)
    }
}

struct Sink {
    stage: String,
    reporter: Arc<dyn Reporter>,
    metrics: Arc<Mutex<StageMetrics>>,
    tracker: Arc<Tracker>,
    uid: String,
}

impl EventSink for Sink {
    fn progress(&self, done: u64, total: Option<u64>, unit: &str) {
        self.reporter.progress(&self.stage, done, total, unit);
    }

    fn log(&self, line: &str) {
        self.reporter.log(&self.stage, line);
    }

    fn metric(&self, name: &str, value: f64, step: Option<u64>) {
        // JSON and MLflow have no NaN or infinity: a value that is not a number is not one.
        if !value.is_finite() {
            return;
        }
        let step = self
            .metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .step_for(name, value, step);
        if let Some(step) = step {
            self.tracker.metric(&self.uid, name, value, step);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_does_not_log_the_steps_its_first_attempt_logged() {
        let mut m = StageMetrics::default();
        // Attempt 1 logs steps 0..=30 and fails; attempt 2 resumes from step 20.
        for step in [0, 10, 20, 30] {
            assert_eq!(m.step_for("loss", 1.0, Some(step)), Some(step as i64));
        }
        assert_eq!(m.step_for("loss", 2.0, Some(20)), None);
        assert_eq!(m.step_for("loss", 2.0, Some(30)), None);
        assert_eq!(m.step_for("loss", 3.0, Some(40)), Some(40));
        // Another metric at a step `loss` logged is its own series.
        assert_eq!(m.step_for("lr", 0.1, Some(20)), Some(20));
        // Without a step: 0, 1, ... across attempts, not 0 again.
        assert_eq!(m.step_for("parameters", 8.0, None), Some(0));
        assert_eq!(m.step_for("parameters", 8.0, None), Some(1));
        // The record keeps each metric's last value, logged or not.
        assert_eq!(m.latest["loss"], 3.0);
        assert_eq!(m.step_for("loss", 4.0, Some(40)), None);
        assert_eq!(m.latest["loss"], 4.0);
    }

    /// Keeps the engine's notes, for the test to read.
    #[derive(Default)]
    struct Notes(Mutex<Vec<String>>);

    impl Reporter for Notes {
        fn started(&self, _: &str, _: &str) {}
        fn progress(&self, _: &str, _: u64, _: Option<u64>, _: &str) {}
        fn log(&self, _: &str, _: &str) {}
        fn finished(&self, _: &StageRecord) {}
        fn note(&self, message: &str) {
            self.0.lock().unwrap().push(message.to_string());
        }
    }

    /// A store on disk, and a stage's checkpoints in it under one key.
    struct Fixture {
        tmp: tempfile::TempDir,
        runtime: tokio::runtime::Runtime,
        store: Store,
        key: CacheKey,
        notes: Arc<Notes>,
        checkpoints: StoreCheckpoints,
    }

    impl Fixture {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let url = format!("file://{}", tmp.path().join("store").display());
            let store = Store::open(&url, tmp.path()).unwrap();
            let notes = Arc::new(Notes::default());
            let key = CacheKey("a".repeat(64));
            let checkpoints = StoreCheckpoints {
                store: store.clone(),
                key: key.clone(),
                dir: tmp.path().join("restored"),
                runtime: runtime.handle().clone(),
                reporter: notes.clone(),
                stage: "model".into(),
                store_failed: Arc::new(AtomicBool::new(false)),
            };
            Fixture {
                tmp,
                runtime,
                store,
                key,
                notes,
                checkpoints,
            }
        }

        fn save(&self, steps: &[u64]) {
            for &step in steps {
                let dir = self.tmp.path().join(format!("saved-{step}"));
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("weights.bin"), format!("weights at {step}")).unwrap();
                self.checkpoints.save(step, &dir).unwrap();
            }
        }

        fn steps(&self) -> Vec<u64> {
            self.runtime
                .block_on(self.store.checkpoint_steps(&self.key))
                .unwrap()
        }
    }

    /// A long training keeps its two newest checkpoints, not all of them.
    #[test]
    fn only_the_newest_checkpoints_are_kept() {
        let f = Fixture::new();
        f.save(&[10, 20, 30, 40]);
        assert_eq!(f.steps(), vec![40, 30]);
    }

    /// A checkpoint the store cannot take fails the stage as the store's failure (exit 3),
    /// not as its work's.
    #[test]
    fn a_store_that_fails_a_checkpoint_is_said_to_be_the_store() {
        let f = Fixture::new();
        f.save(&[10]);
        // Blobs can no longer be written: their folder is a file now.
        let blobs = f.tmp.path().join("store/blobs");
        std::fs::remove_dir_all(&blobs).unwrap();
        std::fs::write(&blobs, "not a folder").unwrap();
        let dir = f.tmp.path().join("saved-20");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("weights.bin"), "weights at 20").unwrap();
        let e = f.checkpoints.save(20, &dir).unwrap_err();
        assert!(e.to_string().contains("cannot store checkpoint 20"), "{e}");
        assert!(f.checkpoints.store_failed.load(Ordering::SeqCst));
    }

    /// A checkpoint whose blob rotted is set aside, and training resumes from the one
    /// before; failing on it instead would fail every rerun, and fsck --repair with it.
    #[test]
    fn a_damaged_checkpoint_is_set_aside_for_the_one_before() {
        let f = Fixture::new();
        f.save(&[10, 20]);
        let files = f
            .runtime
            .block_on(f.store.checkpoint(&f.key, 20))
            .unwrap()
            .unwrap();
        let hex = files[0].digest.strip_prefix("blake3:").unwrap();
        let blob = f
            .tmp
            .path()
            .join(format!("store/blobs/{}/{hex}", &hex[..2]));
        std::fs::write(&blob, "rot").unwrap();

        let (step, dir) = f.checkpoints.latest().unwrap().unwrap();
        assert_eq!(step, 10);
        let weights = std::fs::read_to_string(dir.join("weights.bin")).unwrap();
        assert_eq!(weights, "weights at 10");
        assert_eq!(f.steps(), vec![10]);
        let notes = f.notes.0.lock().unwrap().join("\n");
        assert!(notes.contains("step 20 is damaged"), "{notes}");
    }
}
