//! The `orchestrate` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use orchestrate::diag::counted;
use orchestrate::exec::{execute, ExecOptions};
use orchestrate::pipeline::Pipeline;
use orchestrate::plan::{Plan, PlanError, Selection};
use orchestrate::record::{RunRecord, RunStatus, StageStatus};
use orchestrate::report::fmt_ms;
use orchestrate::spec::PipelineSpec;
use orchestrate::store::{Store, StoreError};
use orchestrate::tracking::{MlflowClient, Tracker};
use orchestrate_stage::CancelToken;

/// Tensor-sized blocks on huge pages, reused between training steps: ~10% of a CPU
/// training step was the kernel faulting in and zeroing glibc's fresh mappings
/// (see the orchestrate-alloc crate).
#[global_allocator]
static ALLOC: orchestrate_alloc::Global = orchestrate_alloc::Global;

/// `print!` and `println!` for this binary's output, `errln!` for `eprintln!`: a closed
/// stdout or stderr (`plan | head -1`) ends the process with 141, as SIGPIPE ends other
/// Unix tools, rather than in std's panic (exit 101 and a backtrace).
macro_rules! out {
    ($($t:tt)*) => { write_or_exit(&mut std::io::stdout(), format_args!($($t)*)) };
}
macro_rules! outln {
    () => { out!("\n") };
    ($($t:tt)*) => { out!("{}\n", format_args!($($t)*)) };
}
macro_rules! errln {
    ($($t:tt)*) => {
        write_or_exit(&mut std::io::stderr(), format_args!("{}\n", format_args!($($t)*)))
    };
}

fn write_or_exit(w: &mut impl std::io::Write, args: std::fmt::Arguments<'_>) {
    if let Err(e) = w.write_fmt(args).and_then(|()| w.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!("error: cannot write output: {e}\n"),
        );
        std::process::exit(1);
    }
}

const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    a stage failed (the run record says which and why), or the command's own work did
       (verify found a difference or nothing stored, sync stopped short, serve's model did
       not load)
  2    invalid pipeline or command line (every problem is listed, with file:line:col)
  3    artifact store error (unreachable, unreadable, or a corrupt artifact found by fsck),
       in a run too: a stage that failed on the store rather than in its work
  4    a quality gate rejected a result
  130  interrupted (Ctrl-C or SIGTERM), whatever failed before; finished stages stay stored
  141  the output was closed early (`plan | head -1`), as for any tool SIGPIPE ends";

#[derive(Parser)]
#[command(name = "orchestrate", version, about = "Runs YAML-declared ML pipelines; every stage output is a cached, content-addressed artifact", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct PipelineArgs {
    /// The pipeline file.
    file: PathBuf,
    /// Override any value: `stage.with.key=value`, `params.name=value`, `storage=URL`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    sets: Vec<String>,
}

#[derive(clap::Args, Clone)]
struct StoreArgs {
    /// Artifact store URL; overrides the pipeline's `storage`.
    #[arg(long, env = "ORCHESTRATE_STORE", value_name = "URL")]
    store: Option<String>,
}

#[derive(clap::Args, Clone)]
struct SelectArgs {
    /// Run only this stage (repeatable); its inputs must already be stored.
    #[arg(long, value_name = "STAGE")]
    only: Vec<String>,
    /// Rerun this stage and everything downstream of it.
    #[arg(long, value_name = "STAGE", conflicts_with = "only")]
    from: Option<String>,
    /// Run this stage and the stages it needs, nothing below or beside it (repeatable).
    #[arg(long, value_name = "STAGE", conflicts_with_all = ["only", "from"])]
    until: Vec<String>,
    /// Rerun this stage even if its artifact is stored (repeatable).
    #[arg(long, value_name = "STAGE", conflicts_with = "force_all")]
    force: Vec<String>,
    /// Rerun every selected stage.
    #[arg(long)]
    force_all: bool,
    /// Verify stored artifacts' contents first and rebuild any that are corrupt (`plan`:
    /// say which are).
    #[arg(long)]
    repair: bool,
}

impl SelectArgs {
    fn selection(&self) -> Selection {
        Selection {
            only: self.only.clone(),
            from: self.from.clone(),
            until: self.until.clone(),
            force: self.force.clone(),
            force_all: self.force_all,
            repair: self.repair,
            dry_run: false,
        }
    }
}

#[derive(Subcommand)]
enum ExportTarget {
    /// An Argo Workflows manifest (YAML): one template per stage, the DAG's dependencies,
    /// GPU requests from `resources`, the S3 store and MLflow from the configuration.
    Argo {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[command(flatten)]
        store: StoreArgs,
        /// The container image with `orchestrate` (deploy/Dockerfile, or Dockerfile.cuda).
        #[arg(long, default_value = "orchestrate:latest")]
        image: String,
        /// Kubernetes secret with AWS_* credentials (and MLFLOW_TRACKING_TOKEN).
        #[arg(long, default_value = "orchestrate-credentials")]
        secret: String,
        /// Write here instead of standard output.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Dot,
    Mermaid,
}

#[derive(clap::Args, Clone)]
struct StoreOnly {
    #[command(flatten)]
    store: StoreArgs,
    /// Take the store from this pipeline file's `storage`.
    #[arg(long, value_name = "FILE")]
    pipeline: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Check a pipeline file and report every problem at once.
    Validate {
        #[command(flatten)]
        pipeline: PipelineArgs,
    },
    /// Show what a run would do, and why each stage that must run has to.
    Plan {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        select: SelectArgs,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the stages whose artifacts are not stored yet.
    Run {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        select: SelectArgs,
        /// How many stages may run at once (default: the number of CPUs).
        #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        jobs: Option<u16>,
        /// Only the closing summary and notes (retries, warnings, interruptions), no progress.
        #[arg(long, short = 'q')]
        quiet: bool,
        /// Do not serve the deployed model after the run (CI); the deploy stage still
        /// smoke-tests a live server.
        #[arg(long)]
        no_serve: bool,
        /// Send nothing to MLflow, whatever `tracking.mlflow` and MLFLOW_TRACKING_URI say:
        /// records stay in the local spool (a later `sync` would deliver them).
        #[arg(long)]
        no_tracking: bool,
    },
    /// Serve a model: a Deployment or Model artifact directory, or `[STORE_URL#]STAGE` for the
    /// artifact of STAGE in the newest run that produced it.
    #[cfg(feature = "model")]
    Serve {
        model: String,
        #[command(flatten)]
        store: StoreOnly,
        /// Address to listen on (default: the deployment's, else 127.0.0.1).
        #[arg(long)]
        host: Option<String>,
        /// Port (default: the deployment's, else 8080; 0 picks a free one).
        #[arg(long)]
        port: Option<u16>,
        /// Require this key (`Authorization: Bearer KEY` or `X-API-Key`); else
        /// $ORCHESTRATE_API_KEY, where an empty variable is unset ('' here serves without one).
        #[arg(long)]
        api_key: Option<String>,
        /// Requests decoded together at most.
        #[arg(long)]
        max_batch: Option<usize>,
        /// Requests that may wait; beyond it the answer is 429 with Retry-After.
        #[arg(long)]
        queue: Option<usize>,
        /// Allow browsers from this origin (repeatable); CORS is off otherwise.
        #[arg(long = "cors-origin", value_name = "ORIGIN")]
        cors_origins: Vec<String>,
        /// Where the model runs: cpu, cuda, cuda:N, auto (CUDA needs a `--features cuda`
        /// build); else $ORCHESTRATE_DEVICE.
        #[arg(long)]
        device: Option<String>,
        /// Decoder workers, each batching requests continuously (default: one per core on the
        /// CPU, one on a GPU).
        #[arg(long)]
        workers: Option<usize>,
        /// How long a shutdown waits for the requests in flight before closing them (30s).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        drain_timeout: Option<Duration>,
        /// How long a client may take to send a request's head, then its body (30s).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        read_timeout: Option<Duration>,
    },
    /// Export the pipeline for another orchestrator.
    Export {
        #[command(subcommand)]
        target: ExportTarget,
    },
    /// Re-execute stages into a scratch store and compare their artifacts' digests with the
    /// stored ones, naming every stage that is not deterministic (exit 1 when one is not).
    Verify {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[command(flatten)]
        store: StoreArgs,
        /// Compare only this stage (repeatable; its upstream stages run too).
        #[arg(long, value_name = "STAGE")]
        stage: Vec<String>,
    },
    /// Print the stage graph.
    Graph {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[arg(long, value_enum, default_value = "dot")]
        format: GraphFormat,
    },
    /// List recorded runs, newest first.
    Runs {
        #[command(flatten)]
        store: StoreOnly,
        /// At most this many runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show one run (an id or a unique prefix of one; `last` for the newest).
    Show {
        run: String,
        #[command(flatten)]
        store: StoreOnly,
        #[arg(long)]
        json: bool,
    },
    /// Delete old runs and the artifacts and blobs no kept run or pin uses.
    Gc {
        #[command(flatten)]
        store: StoreOnly,
        /// Keep this many of the newest runs.
        #[arg(long, default_value_t = 10)]
        keep_last: usize,
        /// Keep objects younger than this, whatever uses them (a run may be writing them).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        grace: Duration,
        /// Report what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Keep a run's artifacts (or one artifact, by its cache key or the key's first 8 or more
    /// characters) through `gc`.
    Pin {
        run_or_key: String,
        #[command(flatten)]
        store: StoreOnly,
    },
    /// Undo `pin`.
    Unpin {
        run_or_key: String,
        #[command(flatten)]
        store: StoreOnly,
    },
    /// Deliver tracking records kept in the local spool to MLflow (idempotent).
    Sync {
        /// The pipeline whose spool (and `tracking.mlflow`) to use.
        #[arg(long, value_name = "FILE")]
        pipeline: Option<PathBuf>,
        /// MLflow tracking URI; else the pipeline's, else MLFLOW_TRACKING_URI.
        #[arg(long, value_name = "URL")]
        mlflow: Option<String>,
        /// The spool directory; else `.orchestrate/spool` beside the pipeline (or ORCHESTRATE_CACHE_DIR).
        #[arg(long, value_name = "DIR")]
        spool: Option<PathBuf>,
    },
    /// Re-read every stored artifact and check its digests.
    Fsck {
        #[command(flatten)]
        store: StoreOnly,
        /// Remove corrupt artifacts so the next run rebuilds them.
        #[arg(long)]
        repair: bool,
    },
}

/// A duration on the command line (`--grace`), where zero is allowed: `0`, `0s`, `0m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    orchestrate::pipeline::parse_duration_or_zero(s)
        .ok_or_else(|| format!("`{s}` is not a duration (try 30s, 10m, 2h)"))
}

/// An error with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let code = match e {
            StoreError::Url { .. } => 2,
            _ => 3,
        };
        Failure::new(code, format!("error: {e}"))
    }
}

impl From<PlanError> for Failure {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::Store(s) => s.into(),
            // The store's data, not the command line: exit 3 as other store damage.
            e @ (PlanError::DamagedManifest { .. } | PlanError::SourceUnreachable { .. }) => {
                Failure::new(3, format!("error: {e}"))
            }
            other => Failure::new(2, format!("error: {other}")),
        }
    }
}

fn main() -> ExitCode {
    // An empty ORCHESTRATE_STORE is unset, as `${env.X:-default}` treats an empty variable
    // (`ORCHESTRATE_STORE= orchestrate run ...` means "the pipeline's own store"). Removed
    // before any other thread exists.
    if std::env::var_os("ORCHESTRATE_STORE").is_some_and(|v| v.is_empty()) {
        std::env::remove_var("ORCHESTRATE_STORE");
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            errln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            errln!("{}", f.message.trim_end());
            ExitCode::from(f.code)
        }
    }
}

fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The pipeline, for commands that validate, plan or run it: the files its stages read must
/// exist.
fn load(args: &PipelineArgs) -> Result<Pipeline, Failure> {
    PipelineSpec::load(&args.file, &args.sets, &env_lookup)
        .and_then(PipelineSpec::validate)
        .map_err(|invalid| Failure::new(2, invalid.render()))
}

/// The pipeline, for commands that only look at it (see [`PipelineSpec::validate_shape`]).
fn load_shape(args: &PipelineArgs) -> Result<Pipeline, Failure> {
    PipelineSpec::load(&args.file, &args.sets, &env_lookup)
        .and_then(PipelineSpec::validate_shape)
        .map_err(|invalid| Failure::new(2, invalid.render()))
}

/// The store a command names: `--store` (or `ORCHESTRATE_STORE`), else the pipeline's, and
/// the folder a relative `file://` one is relative to.
fn store_url<'a>(p: &'a Pipeline, args: &'a StoreArgs) -> (&'a str, &'a Path) {
    match &args.store {
        Some(url) => (url, Path::new(".")),
        None => (&p.storage, &p.dir),
    }
}

fn open_store(p: &Pipeline, args: &StoreArgs) -> Result<Store, Failure> {
    let (url, base) = store_url(p, args);
    Ok(Store::open(url, base)?)
}

/// With `--pipeline`, that pipeline's `name`: a store may hold the runs of several
/// pipelines (this repository's three share `artifacts/`), and `runs`, `show last` and
/// `serve STAGE` then look at that pipeline's alone.
#[cfg(feature = "model")]
fn pipeline_name(args: &StoreOnly) -> Result<Option<String>, Failure> {
    args.pipeline
        .as_ref()
        .map(|file| {
            load_shape(&PipelineArgs {
                file: file.clone(),
                sets: Vec::new(),
            })
            .map(|p| p.name.clone())
        })
        .transpose()
}

/// A store that must be there already. Every command but `run` (and `plan`, which shows
/// what `run` would do) only reads a store, and opening a `file://` one that is not there
/// creates it: `fsck`, `gc` or `runs` pointed at a mistyped path reported success on an
/// empty store of their own making.
fn open_existing(url: &str, base: &Path) -> Result<Store, Failure> {
    if let Some(dir) = orchestrate::store::local_dir(url, base) {
        if !dir.is_dir() {
            return Err(Failure::new(
                2,
                format!(
                    "error: no store at {} (`{url}`): only `run` creates one; check the path",
                    dir.display()
                ),
            ));
        }
    }
    Ok(Store::open(url, base)?)
}

/// [`open_store`] for a command that only reads the store: see [`open_existing`].
fn open_existing_store(p: &Pipeline, args: &StoreArgs) -> Result<Store, Failure> {
    let (url, base) = store_url(p, args);
    open_existing(url, base)
}

fn open_store_only(args: &StoreOnly) -> Result<Store, Failure> {
    if let Some(url) = &args.store.store {
        return open_existing(url, Path::new("."));
    }
    open_store_of(args).map(|(store, _)| store)
}

/// The store, and with `--pipeline` that pipeline's `name` (see [`pipeline_name`]), from
/// one reading of the pipeline file.
fn open_store_of(args: &StoreOnly) -> Result<(Store, Option<String>), Failure> {
    let p = args
        .pipeline
        .as_ref()
        .map(|file| {
            load_shape(&PipelineArgs {
                file: file.clone(),
                sets: Vec::new(),
            })
        })
        .transpose()?;
    let name = p.as_ref().map(|p| p.name.clone());
    let store = match (&args.store.store, &p) {
        (Some(url), _) => open_existing(url, Path::new("."))?,
        (None, Some(p)) => open_existing_store(p, &args.store)?,
        // Opening a store that is not there would create it: `fsck` or `gc` run in the
        // wrong directory would then report success on an empty store of their own making.
        (None, None) if !Path::new("artifacts").is_dir() => {
            return Err(Failure::new(
                2,
                "error: no store here: the default store `artifacts/` does not exist in this directory; pass --store URL or --pipeline FILE",
            ))
        }
        (None, None) => Store::open("file://artifacts", Path::new("."))?,
    };
    Ok((store, name))
}

/// How often a run samples the machine's CPU, memory and GPUs: every 10 s, or
/// `ORCHESTRATE_SYSTEM_METRICS_SECS`, which must be a positive number of seconds.
fn system_metrics_every() -> Result<Duration, Failure> {
    const VAR: &str = "ORCHESTRATE_SYSTEM_METRICS_SECS";
    let Some(value) = std::env::var_os(VAR) else {
        return Ok(Duration::from_secs(10));
    };
    let value = value.to_string_lossy();
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| {
            Failure::new(
                2,
                format!("error: {VAR} must be a positive number of seconds, got `{value}`"),
            )
        })
}

/// `tracking.mlflow` from the pipeline, else `MLFLOW_TRACKING_URI`.
fn mlflow_url(p: &Pipeline) -> Option<String> {
    p.tracking
        .mlflow
        .clone()
        .or_else(|| std::env::var("MLFLOW_TRACKING_URI").ok())
        .filter(|u| !u.trim().is_empty())
}

fn cache_dir(p: &Pipeline) -> PathBuf {
    cache_dir_in(&p.dir)
}

/// The local cache: `ORCHESTRATE_CACHE_DIR`, else `.orchestrate/` in `dir` (the pipeline's
/// folder, or the working directory where no pipeline is named).
fn cache_dir_in(dir: &Path) -> PathBuf {
    std::env::var_os("ORCHESTRATE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join(".orchestrate"))
}

async fn dispatch(cli: Cli) -> Result<u8, Failure> {
    match cli.command {
        Command::Validate { pipeline } => {
            let p = load(&pipeline)?;
            let edges = p.graph.edge_count();
            outln!(
                "{}: pipeline `{}` is valid: {}, {}",
                pipeline.file.display(),
                p.name,
                counted(p.stages.len(), "stage"),
                counted(edges, "edge")
            );
            Ok(0)
        }
        Command::Plan {
            pipeline,
            store,
            select,
            json,
        } => {
            let p = load(&pipeline)?;
            let selection = Selection {
                dry_run: true,
                ..select.selection()
            };
            selection.check_names(&p)?;
            let store = open_store(&p, &store)?;
            let plan = Plan::build(&p, &store, &selection).await?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&plan).expect("plain JSON")
                );
            } else {
                out!("{}", plan.render());
            }
            Ok(0)
        }
        Command::Run {
            pipeline,
            store,
            select,
            jobs,
            quiet,
            no_serve,
            no_tracking,
        } => {
            let p = Arc::new(load(&pipeline)?);
            select.selection().check_names(&p)?;
            let store = open_store(&p, &store)?;
            // Before anything is produced: locks and commits rely on create-only writes.
            store.check_create_only().await?;
            let plan = Plan::build(&p, &store, &select.selection()).await?;
            #[cfg(feature = "model")]
            if !no_serve {
                // Found now, not after a training run of an hour and more.
                serving_key_problem(&p, &plan)?;
            }
            let cancel = CancelToken::new();
            let reporter: Arc<dyn orchestrate::report::Reporter> =
                Arc::from(orchestrate::report::for_stderr(quiet));
            watch_signals(cancel.clone(), Arc::clone(&reporter));
            let cache = cache_dir(&p);
            let client = mlflow_url(&p)
                .filter(|_| !no_tracking)
                .map(|u| MlflowClient::new(&u));
            let run_id = orchestrate::record::new_run_id(chrono::Utc::now());
            let tracker = Tracker::new(&cache.join("spool"), &run_id, client)
                .map_err(|e| Failure::new(1, format!("error: {e}")))?;
            let opts = ExecOptions {
                run_id,
                jobs: jobs.map(usize::from).unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(2)
                }),
                cache_dir: cache,
                // Recorded as text: a path that is not UTF-8 is kept, its odd bytes as U+FFFD
                // (`args()` panics on one).
                args: std::env::args_os()
                    .skip(1)
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect(),
                tracker,
                experiment: p.tracking.experiment.clone(),
                system_metrics_every: system_metrics_every()?,
                repair: select.repair,
            };
            let serve_store = store.clone();
            let (record, record_error) =
                execute(Arc::clone(&p), store, plan, opts, reporter, cancel.clone()).await?;
            out!("{}", summary(&record));
            let code = exit_code(&record);
            if let Some(e) = record_error {
                let message = format!("error: the run record was not stored: {e}");
                // The run's own outcome comes first: a gate's 4 is final and an interrupt's
                // 130 is the user's, where a 3 would have Argo retry them; the record's
                // failure is said all the same.
                if code != 0 {
                    errln!("{message}");
                    return Ok(code);
                }
                return Err(Failure::new(3, message));
            }
            #[cfg(feature = "model")]
            if code == 0 && !no_serve {
                if let Some(dir) = deployed_dir(&serve_store, &record, &cache_dir(&p)).await? {
                    // Ctrl-C (or `docker stop`) after the last stage, while the deployment
                    // downloaded: the user asked to stop, not to serve.
                    if cancel.is_cancelled() {
                        return Ok(130);
                    }
                    return serve_dir(&dir, ServeOverrides::from_env()).await;
                }
            }
            #[cfg(not(feature = "model"))]
            let _ = (no_serve, serve_store);
            Ok(code)
        }
        #[cfg(feature = "model")]
        Command::Serve {
            model,
            store,
            host,
            port,
            api_key,
            max_batch,
            queue,
            cors_origins,
            device,
            workers,
            drain_timeout,
            read_timeout,
        } => {
            // The variables are read here, not by clap, which passes an empty one on as a
            // value: an empty ORCHESTRATE_API_KEY (`docker -e` of an unset host variable)
            // served with no key, even where the deployment names the variable to take
            // its key from.
            let env = ServeOverrides::from_env();
            let mut overrides = ServeOverrides {
                host,
                port,
                api_key: api_key.or(env.api_key),
                max_batch,
                queue,
                cors_origins,
                device: device.or(env.device),
                workers,
                drain_timeout,
                read_timeout,
                stored: None,
            };
            // A directory holding an artifact; otherwise a stage (`deploy` may also be the
            // name of a plain directory, as in this repository).
            let dir = Path::new(&model);
            let holds_artifact = dir.join(orchestrate_serve::deploy::DEPLOYMENT).is_file()
                || dir.join(orchestrate_model::artifact::CARD).is_file();
            // Without a store named, the default one is looked in only where it exists
            // (opening it would create it).
            let store_given = store.pipeline.is_some()
                || store.store.store.is_some()
                || model.contains('#')
                || Path::new("artifacts").is_dir();
            if holds_artifact || !store_given {
                if !dir.exists() {
                    return Err(Failure::new(
                        2,
                        format!(
                            "error: there is no directory {model}, and no store here to find a stage `{model}` in; give a deployment's or a model's directory, `STAGE` with --pipeline/--store, or `URL#STAGE`"
                        ),
                    ));
                }
                return serve_dir(dir, overrides).await;
            }
            // The cache `run` fills: beside the pipeline named, as for `run` and `sync`.
            let beside = store
                .pipeline
                .as_deref()
                .and_then(Path::parent)
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let cache = cache_dir_in(beside);
            let (store, stage, pipeline) = match model.split_once('#') {
                Some((url, stage)) => (
                    open_existing(url, Path::new("."))?,
                    stage.to_string(),
                    pipeline_name(&store)?,
                ),
                None => {
                    let (opened, name) = open_store_of(&store)?;
                    (opened, model.clone(), name)
                }
            };
            let found = stage_artifact(&store, &stage, pipeline.as_deref(), &cache).await;
            // Neither an artifact directory nor a stage in the store: say both.
            let (dir, digest) = match found {
                Err(e) if e.code == 2 && dir.is_dir() => {
                    return serve_dir(dir, overrides)
                        .await
                        .map_err(|d| Failure::new(2, format!("{}\n{}", d.message, e.message)))
                }
                found => found?,
            };
            overrides.stored = Some(Stored { stage, digest });
            serve_dir(&dir, overrides).await
        }
        Command::Export {
            target:
                ExportTarget::Argo {
                    pipeline,
                    store,
                    image,
                    secret,
                    output,
                },
        } => {
            let p = load_shape(&pipeline)?;
            let source = std::fs::read_to_string(&pipeline.file).map_err(|e| {
                Failure::new(
                    2,
                    format!("error: cannot read {}: {e}", pipeline.file.display()),
                )
            })?;
            let opts = orchestrate::export::ArgoOptions {
                image,
                store: store.store,
                secret,
                mlflow: mlflow_url(&p),
                sets: pipeline.sets.clone(),
            };
            let wf = orchestrate::export::argo(&p, &source, &opts)
                .map_err(|e| Failure::new(2, format!("error: {e}")))?;
            // Only the pipeline file travels into the workflow: a file read from beside it
            // must be in the image, or the task fails on the cluster.
            for s in &p.stages {
                for d in s.deps.iter().filter(|d| !d.contains("://")) {
                    let path = Path::new(d);
                    if path.is_relative() || (p.dir.is_absolute() && path.starts_with(&p.dir)) {
                        errln!(
                            "warning: stage `{}` reads `{d}` from beside the pipeline file, but an Argo task has only the pipeline file ({}); put the file in the image at the same place relative to it, or read it from s3://",
                            s.name,
                            orchestrate::export::PIPELINE_PATH
                        );
                    }
                }
            }
            let text = orchestrate::export::to_yaml(&wf);
            match output {
                // A path that cannot be written is a command-line mistake (exit 2), and a
                // workflow file half-written over the last good one is worse than none.
                Some(f) => orchestrate::write_whole(&f, text.as_bytes()).map_err(|e| {
                    Failure::new(2, format!("error: cannot write {}: {e}", f.display()))
                })?,
                None => out!("{text}"),
            }
            Ok(0)
        }
        Command::Verify {
            pipeline,
            store,
            stage,
        } => verify(&pipeline, &store, &stage).await,
        Command::Graph { pipeline, format } => {
            let p = load_shape(&pipeline)?;
            out!(
                "{}",
                match format {
                    GraphFormat::Dot => orchestrate::graph::dot(&p),
                    GraphFormat::Mermaid => orchestrate::graph::mermaid(&p),
                }
            );
            Ok(0)
        }
        Command::Runs { store, limit, json } => {
            let (store, name) = open_store_of(&store)?;
            let ids = store.list_run_ids().await?;
            let mut runs = Vec::new();
            for id in ids.iter().rev() {
                if runs.len() == limit {
                    break;
                }
                match store.get_run::<RunRecord>(id).await {
                    Ok(Some(r)) if name.as_ref().is_none_or(|n| *n == r.pipeline) => runs.push(r),
                    Ok(_) => {}
                    // One damaged record must not hide every other run.
                    Err(e) if e.is_damage() => {
                        errln!("warning: run record `{id}` is unreadable, passed over: {e}")
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if json {
                let runs: Vec<serde_json::Value> = runs.iter().map(run_json).collect();
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&runs).expect("plain JSON")
                );
            } else {
                out!("{}", runs_table(&runs));
            }
            Ok(0)
        }
        Command::Show { run, store, json } => {
            let (store, name) = open_store_of(&store)?;
            let id = resolve_run(&store, &run, name.as_deref()).await?;
            let record: RunRecord = store
                .get_run(&id)
                .await?
                .ok_or_else(|| Failure::new(2, format!("error: no run `{id}`")))?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&run_json(&record)).expect("plain JSON")
                );
            } else {
                out!("{}", show(&record));
            }
            Ok(0)
        }
        Command::Gc {
            store,
            keep_last,
            grace,
            dry_run,
        } => {
            let cache = match &store.pipeline {
                Some(file) => cache_dir(&load_shape(&PipelineArgs {
                    file: file.clone(),
                    sets: Vec::new(),
                })?),
                None => cache_dir_in(Path::new(".")),
            };
            let (store, pipeline) = open_store_of(&store)?;
            let mut r =
                orchestrate::gc::collect(&store, pipeline.as_deref(), keep_last, grace, dry_run)
                    .await?;
            let kept = std::mem::take(&mut r.kept_digests);
            let identity = store.identity();
            let local = tokio::task::spawn_blocking(move || {
                orchestrate::gc::tidy_local_cache(&cache, &identity, &kept, grace, dry_run)
            })
            .await
            .unwrap_or_default();
            let dry = if dry_run { "dry run: " } else { "" };
            outln!(
                "{dry}kept {} and {}; deleted {}, {}, {}, {}{} ({}){}",
                counted(r.runs_kept, "run"),
                counted(r.artifacts_kept, "artifact"),
                counted(r.runs_deleted, "run"),
                counted(r.artifacts_deleted, "artifact"),
                counted(r.checkpoints_deleted, "checkpoint"),
                counted(r.blobs_deleted, "blob"),
                match r.staging_deleted {
                    0 => String::new(),
                    n => format!(", {} killed writes left", counted(n, "half-written object")),
                },
                counted(r.bytes_freed, "byte"),
                match r.producing {
                    0 => String::new(),
                    1 => "; 1 stage is producing now, so unreferenced blobs were kept".into(),
                    n => format!("; {n} stages are producing now, so unreferenced blobs were kept"),
                }
            );
            if r.unreadable_kept > 0 {
                outln!(
                    "{dry}{} kept cannot be read (not JSON naming its stages): what it uses is unknown, so no artifact was deleted; `orchestrate fsck` names it",
                    counted(r.unreadable_kept, "run record")
                );
            }
            if local.work_deleted + local.copies_deleted > 0 {
                outln!(
                    "{dry}local cache: deleted {} of runs over and {} the store no longer keeps ({})",
                    counted(local.work_deleted, "working folder"),
                    counted(local.copies_deleted, "downloaded artifact"),
                    counted(local.bytes_freed, "byte"),
                );
            }
            if local.live_runs > 0 {
                outln!(
                    "local cache: {} going on from it, so downloaded copies were kept",
                    counted(local.live_runs, "run")
                );
            } else if local.other_store {
                outln!("local cache: its downloaded copies come from another store, and were kept");
            }
            Ok(0)
        }
        Command::Pin { run_or_key, store } => {
            let (store, name) = open_store_of(&store)?;
            let (holder, keys) = keys_for(&store, &run_or_key, name.as_deref()).await?;
            for k in &keys {
                store.pin(k, &holder).await?;
            }
            outln!("pinned {}", counted(keys.len(), "artifact"));
            Ok(0)
        }
        Command::Unpin { run_or_key, store } => {
            let (store, name) = open_store_of(&store)?;
            let (holder, keys) = keys_for(&store, &run_or_key, name.as_deref()).await?;
            if keys.len() == 1 && keys[0].0 == holder {
                // `unpin KEY`: the artifact is unpinned, whichever runs pinned it.
                let holders = store.unpin_every(&keys[0]).await?;
                let others: Vec<&String> = holders.iter().filter(|h| **h != holder).collect();
                let by = if others.is_empty() {
                    String::new()
                } else {
                    let names: Vec<&str> = others.iter().map(|h| h.as_str()).collect();
                    format!(" (pinned by {})", names.join(", "))
                };
                let n = usize::from(!holders.is_empty());
                outln!("unpinned {}{by}", counted(n, "artifact"));
                return Ok(0);
            }
            let mut n = 0;
            for k in &keys {
                n += usize::from(store.unpin(k, &holder, &run_or_key).await?);
            }
            outln!("unpinned {}", counted(n, "artifact"));
            Ok(0)
        }
        Command::Sync {
            pipeline,
            mlflow,
            spool,
        } => {
            let p = match &pipeline {
                Some(file) => Some(load_shape(&PipelineArgs {
                    file: file.clone(),
                    sets: Vec::new(),
                })?),
                None => None,
            };
            let url = mlflow
                .or_else(|| p.as_ref().and_then(mlflow_url))
                .or_else(|| std::env::var("MLFLOW_TRACKING_URI").ok().filter(|u| !u.is_empty()))
                .ok_or_else(|| Failure::new(2, "error: no MLflow server: pass --mlflow URL, set tracking.mlflow, or MLFLOW_TRACKING_URI"))?;
            if !orchestrate::pipeline::is_http_url(&url) {
                return Err(Failure::new(
                    2,
                    format!("error: `{url}` is not an MLflow server's URL: write it as http://HOST:PORT or https://HOST"),
                ));
            }
            // A spool folder named on the command line that is not there is a typo, not a
            // spool with nothing to deliver.
            if let Some(dir) = spool.as_ref().filter(|d| !d.is_dir()) {
                return Err(Failure::new(
                    2,
                    format!("error: no spool folder {}", dir.display()),
                ));
            }
            // A pipeline's own spools, where the folder is its cache's (a `--spool` folder
            // named is delivered whole).
            let only = p
                .as_ref()
                .filter(|_| spool.is_none())
                .map(|p| p.name.clone());
            let dir = spool.unwrap_or_else(|| match &p {
                Some(p) => cache_dir(p).join("spool"),
                None => cache_dir_in(Path::new(".")).join("spool"),
            });
            let client = MlflowClient::new(&url);
            match orchestrate::tracking::sync(&client, &dir, only.as_deref()).await {
                Ok(s) => {
                    outln!(
                        "delivered {} records from {} spooled runs to {}",
                        s.sent,
                        s.files,
                        client.url()
                    );
                    if s.killed > 0 && s.stopped.is_empty() {
                        outln!(
                            "ended {} MLflow runs as KILLED: their orchestrate process died before ending them",
                            s.killed
                        );
                    } else if s.killed > 0 {
                        outln!(
                            "recorded {} runs as KILLED in their spools (their orchestrate process died before ending them); MLflow is told with their other records",
                            s.killed
                        );
                    }
                    if s.running > 0 {
                        outln!(
                            "passed over {} spools of runs still running: they deliver their own",
                            s.running
                        );
                    }
                    if s.other_pipelines > 0 {
                        outln!(
                            "passed over {} spools of other pipelines sharing this cache (`sync --pipeline` each, or `--spool {}` for all)",
                            s.other_pipelines,
                            dir.display()
                        );
                    }
                    for r in &s.rejected {
                        errln!("warning: {r}");
                    }
                    for (file, e) in &s.stopped {
                        errln!("error: {}: {e}", file.display());
                    }
                    if s.untried > 0 {
                        errln!(
                            "error: {} more spooled runs not tried: the server stopped the one above",
                            s.untried
                        );
                    }
                    if s.stopped.is_empty() {
                        Ok(0)
                    } else {
                        Err(Failure::new(
                            1,
                            format!(
                                "error: {} of {} spooled runs stopped short; their records stay in {} for the next sync",
                                s.stopped.len() + s.untried,
                                s.files,
                                dir.display()
                            ),
                        ))
                    }
                }
                Err(e) => Err(Failure::new(
                    1,
                    format!("error: {e}; the records stay in {}", dir.display()),
                )),
            }
        }
        Command::Fsck { store, repair } => {
            let store = open_store_only(&store)?;
            let mut bad = 0;
            let keys = store.list_manifest_keys().await?;
            for (key, _) in &keys {
                let m = match store.manifest(key).await {
                    Ok(Some(m)) => m,
                    Ok(None) => continue,
                    // The manifest itself is unreadable (bad JSON, or a digest that does not
                    // match its file list): the artifact it describes cannot be trusted.
                    Err(e @ orchestrate::store::StoreError::Decode { .. }) => {
                        bad += 1;
                        outln!("corrupt: manifest of key {}: {e}", key.short());
                        if repair {
                            store.delete_manifest(key).await?;
                            outln!("  removed; the next run rebuilds it");
                        }
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let problems = store.verify(&m).await?;
                if !problems.is_empty() {
                    bad += 1;
                    let what: Vec<&str> = problems.iter().map(|(_, why)| why.as_str()).collect();
                    outln!(
                        "corrupt: artifact of stage `{}` (key {}): {}",
                        m.stage,
                        key.short(),
                        what.join("; ")
                    );
                    if repair {
                        store.discard_corrupt(&m, &problems).await?;
                        outln!("  removed; the next run rebuilds it");
                    }
                }
            }
            // Checkpoints of unfinished trainings: a damaged one would be resumed from.
            let checkpoints = store.all_checkpoints().await?;
            for (key, step) in &checkpoints {
                let problem = match store.checkpoint(key, *step).await {
                    Ok(None) => continue,
                    Ok(Some(files)) => {
                        let problems = store.verify_files(&files).await?;
                        if problems.is_empty() {
                            continue;
                        }
                        let what: Vec<&str> =
                            problems.iter().map(|(_, why)| why.as_str()).collect();
                        what.join("; ")
                    }
                    Err(e) if e.is_damage() => e.to_string(),
                    Err(e) => return Err(e.into()),
                };
                bad += 1;
                outln!(
                    "corrupt: checkpoint at step {step} (key {}): {problem}",
                    key.short()
                );
                if repair {
                    store.drop_checkpoint(key, *step).await?;
                    outln!(
                        "  removed; training resumes from an earlier checkpoint, or from the start"
                    );
                }
            }
            // Run records and history entries: damaged ones are passed over by `runs`,
            // `plan` and `gc`, and removed here.
            let run_ids = store.list_run_ids().await?;
            for id in &run_ids {
                match store.get_run::<RunRecord>(id).await {
                    // JSON that this version cannot read may be a newer version's record in
                    // a shared store: named, never removed.
                    Err(e)
                        if e.is_damage()
                            && store.get_run::<serde_json::Value>(id).await.is_ok() =>
                    {
                        outln!("note: run record `{id}` is not one this version reads (left as it is): {e}");
                    }
                    Err(e) if e.is_damage() => {
                        bad += 1;
                        outln!("corrupt: run record `{id}`: {e}");
                        if repair {
                            store.delete_run(id).await?;
                            outln!("  removed");
                        }
                    }
                    Err(e) => return Err(e.into()),
                    Ok(_) => {}
                }
            }
            for path in store.damaged_history().await? {
                bad += 1;
                outln!("corrupt: history entry `{path}`");
                if repair {
                    store.remove_history(&path).await?;
                    outln!("  removed");
                }
            }
            outln!(
                "checked {} artifacts, {} checkpoints and {} run records: {} corrupt",
                keys.len(),
                checkpoints.len(),
                run_ids.len(),
                bad
            );
            Ok(if bad > 0 && !repair { 3 } else { 0 })
        }
    }
}

/// First Ctrl-C or SIGTERM: stop at a safe point. Second: leave at once.
fn watch_signals(cancel: CancelToken, reporter: Arc<dyn orchestrate::report::Reporter>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        // Both listeners live as long as this: one made anew each pass would miss a second
        // Ctrl-C that came before it existed.
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        let mut count = 0;
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            count += 1;
            if count == 1 {
                reporter.note(
                    "interrupted: stopping running stages at a safe point (again to quit at once)",
                );
                cancel.cancel();
            } else {
                reporter
                    .note("quit: MLflow runs left open are ended as KILLED by `orchestrate sync`");
                std::process::exit(130);
            }
        }
    });
}

#[cfg(feature = "model")]
#[derive(Default)]
struct ServeOverrides {
    host: Option<String>,
    port: Option<u16>,
    api_key: Option<String>,
    max_batch: Option<usize>,
    queue: Option<usize>,
    cors_origins: Vec<String>,
    device: Option<String>,
    workers: Option<usize>,
    drain_timeout: Option<Duration>,
    read_timeout: Option<Duration>,
    /// The stage and content digest of an artifact taken from the store: a bare Model's
    /// name and `model_sha` (its materialised directory is only called `files`).
    stored: Option<Stored>,
}

#[cfg(feature = "model")]
impl ServeOverrides {
    /// The variables `serve` reads where its options are absent (`ORCHESTRATE_API_KEY`,
    /// `ORCHESTRATE_DEVICE`), an empty one being unset; all `run` serves its deployment
    /// with, beside the deployment's own settings. Without this, a key set for `serve` was
    /// silently not required by the server `run` starts.
    fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        ServeOverrides {
            api_key: var("ORCHESTRATE_API_KEY"),
            device: var("ORCHESTRATE_DEVICE"),
            ..Default::default()
        }
    }
}

/// A deploy stage, selected to run or cached, whose server `run` would not start for its
/// API key: `api_key_env` names a variable that is unset or empty (and so is
/// `ORCHESTRATE_API_KEY`), or the key is one no HTTP header carries. Found after every stage
/// before it had run, otherwise.
#[cfg(feature = "model")]
fn serving_key_problem(p: &Pipeline, plan: &Plan) -> Result<(), Failure> {
    let from_env = ServeOverrides::from_env().api_key;
    let refuse = |msg: String| Err(Failure::new(2, format!("error: {msg}")));
    let selected = p
        .stages
        .iter()
        .zip(&plan.stages)
        .filter(|(stage, planned)| {
            stage.kind.name() == "deploy"
                && planned.status != orchestrate::plan::Status::NotSelected
        });
    for (stage, _) in selected {
        let var = stage.params["api_key_env"].as_str();
        let key = from_env.clone().or_else(|| {
            var.and_then(|v| std::env::var(v).ok())
                .filter(|k| !k.is_empty())
        });
        match (key, var) {
            (Some(key), _) => {
                if let Some(problem) = orchestrate_serve::api_key_problem(&key) {
                    return refuse(format!("stage `{}` would serve with an API key that {problem}", stage.name));
                }
            }
            (None, Some(var)) => {
                return refuse(format!(
                    "stage `{}` serves with the API key in ${var} (its `api_key_env`), which is unset or empty; set it (or ORCHESTRATE_API_KEY), or run with --no-serve",
                    stage.name
                ))
            }
            (None, None) => {}
        }
    }
    Ok(())
}

/// Where a served artifact came from in the store.
#[cfg(feature = "model")]
struct Stored {
    stage: String,
    digest: String,
}

/// A finished stage's artifact, materialised under `cache`, and its manifest's digest;
/// `None` when none is stored.
#[cfg(feature = "model")]
async fn stored_artifact(
    store: &Store,
    stage: &orchestrate::record::StageRecord,
    cache: &Path,
) -> Result<Option<(PathBuf, String)>, Failure> {
    if !matches!(stage.status, StageStatus::Ran | StageStatus::Cached) {
        return Ok(None);
    }
    let Some(key) = &stage.key else {
        return Ok(None);
    };
    let Some(m) = store.manifest(key).await? else {
        return Ok(None);
    };
    // Said before anything is downloaded (a corpus may be gigabytes) rather than after.
    use orchestrate_stage::ArtifactKind;
    if !matches!(
        m.kind,
        ArtifactKind::Model | ArtifactKind::Deployment | ArtifactKind::Files
    ) {
        return Err(Failure::new(
            2,
            format!(
                "error: stage `{}` produced a {}, and serve needs a Model (a train or quantize stage) or a Deployment (a deploy stage)",
                stage.stage, m.kind
            ),
        ));
    }
    orchestrate::gc::mark_local_cache(cache, &store.identity());
    Ok(Some((
        orchestrate::exec::materialize_in(store, &cache.join("artifacts"), &m).await?,
        m.digest,
    )))
}

/// The artifact of the first `deploy` stage of a finished run, materialised locally.
#[cfg(feature = "model")]
async fn deployed_dir(
    store: &Store,
    record: &RunRecord,
    cache: &Path,
) -> Result<Option<PathBuf>, Failure> {
    let Some(stage) = record.stages.iter().find(|s| {
        s.kind == "deploy"
            && s.key.is_some()
            && matches!(s.status, StageStatus::Ran | StageStatus::Cached)
    }) else {
        return Ok(None);
    };
    match stored_artifact(store, stage, cache).await? {
        Some((dir, _)) => Ok(Some(dir)),
        None => Err(Failure::new(
            3,
            format!(
                "error: the artifact of `{}` is not in the store",
                stage.stage
            ),
        )),
    }
}

/// The artifact of `stage` in the newest run that produced or reused it, and its digest.
#[cfg(feature = "model")]
async fn stage_artifact(
    store: &Store,
    stage: &str,
    pipeline: Option<&str>,
    cache: &Path,
) -> Result<(PathBuf, String), Failure> {
    let ids = store.list_run_ids().await?;
    for id in ids.iter().rev() {
        // A damaged record, or a newer version's, is passed over, as `show last` does.
        let record = match store.get_run::<RunRecord>(id).await {
            Ok(Some(record)) => record,
            Ok(None) => continue,
            Err(e) if e.is_damage() => continue,
            Err(e) => return Err(e.into()),
        };
        if pipeline.is_some_and(|p| p != record.pipeline) {
            continue;
        }
        if let Some(s) = record.stages.iter().find(|s| s.stage == stage) {
            if let Some(found) = stored_artifact(store, s, cache).await? {
                return Ok(found);
            }
        }
    }
    let of = pipeline
        .map(|p| format!(" of pipeline `{p}`"))
        .unwrap_or_default();
    Err(Failure::new(
        2,
        format!(
            "error: no run{of} in {} produced a stage `{stage}`; give a directory, `STAGE` with --pipeline/--store, or `URL#STAGE`",
            store.url()
        ),
    ))
}

/// Serves until Ctrl-C or SIGTERM, then drains the requests in flight.
#[cfg(feature = "model")]
async fn serve_dir(dir: &Path, o: ServeOverrides) -> Result<u8, Failure> {
    let (model_dir, mut opts) = orchestrate_serve::deploy::resolve(dir)
        .map_err(|e| Failure::new(2, format!("error: {e}")))?;
    // A Deployment names its model itself; a bare Model from the store is known by its
    // stage and content digest.
    if let Some(stored) = o.stored {
        if !dir.join(orchestrate_serve::deploy::DEPLOYMENT).is_file() {
            opts.name = stored.stage;
            opts.digest = stored.digest;
        }
    }
    if let Some(h) = o.host {
        opts.host = h;
    }
    if let Some(p) = o.port {
        opts.port = p;
    }
    if o.api_key.is_some() {
        // Given on the command line, even empty (no key, on purpose), it overrides the
        // deployment's variable.
        opts.api_key = o.api_key.filter(|k| !k.is_empty());
        opts.key_from = None;
    }
    if let (None, Some(var)) = (&opts.api_key, &opts.key_from) {
        return Err(Failure::new(
            2,
            format!(
                "error: the deployment takes its API key from ${var} (its `api_key_env`), which is unset or empty; set it, or give --api-key KEY (--api-key '' serves without one)"
            ),
        ));
    }
    if let Some(b) = o.max_batch {
        opts.max_batch = b;
    }
    if let Some(q) = o.queue {
        opts.queue = q;
    }
    if let Some(d) = o.device {
        opts.device = d;
    }
    if let Some(w) = o.workers {
        opts.workers = w;
    }
    if let Some(d) = o.drain_timeout {
        opts.drain_timeout = d;
    }
    if let Some(r) = o.read_timeout {
        opts.read_timeout = r;
    }
    if !o.cors_origins.is_empty() {
        if let Some(problem) = o
            .cors_origins
            .iter()
            .find_map(|origin| orchestrate_serve::api::cors_origin_problem(origin))
        {
            return Err(Failure::new(2, format!("error: --cors-origin: {problem}")));
        }
        opts.cors_origins = Some(o.cors_origins);
    }
    let name = opts.name.clone();
    let drain = opts.drain_timeout.as_secs_f64();
    // The first Ctrl-C or SIGTERM drains the requests in flight (for `drain_timeout` at
    // most); a second one stops at once, as someone pressing Ctrl-C again means.
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    // Installed before the server listens: a signal from then on is caught, not fatal.
    let mut signals = StopSignals::new();
    tokio::spawn(async move {
        signals.next().await;
        errln!(
            "stopping: finishing the requests in flight (up to {drain} s; Ctrl-C again stops at once)"
        );
        let _ = first_tx.send(());
        signals.next().await;
        errln!("stopped at once: the requests in flight were cut off");
        std::process::exit(130);
    });
    let shutdown = async {
        let _ = first_rx.await;
    };
    orchestrate_serve::serve(
        &model_dir,
        &opts,
        |addr| {
            errln!(
                "serving `{name}` at http://{addr} (API docs: http://{addr}/docs); Ctrl-C stops"
            );
        },
        shutdown,
    )
    .await
    // The options' problems (an address, a device, a limit of 0) are the command line's.
    .map_err(|e| Failure::new(if e.usage { 2 } else { 1 }, format!("error: {e}")))?;
    Ok(0)
}

/// Ctrl-C and SIGTERM, each time either comes. The listeners live as long as this, so a
/// second signal sent right after the first is not missed between two listeners.
#[cfg(all(feature = "model", unix))]
struct StopSignals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

#[cfg(all(feature = "model", unix))]
impl StopSignals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        StopSignals {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    async fn next(&mut self) {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.int) => {}
            _ = recv(&mut self.term) => {}
        }
    }
}

#[cfg(all(feature = "model", not(unix)))]
struct StopSignals;

#[cfg(all(feature = "model", not(unix)))]
impl StopSignals {
    fn new() -> Self {
        StopSignals
    }

    async fn next(&mut self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the whole pipeline again into a scratch store (its own cache, no tracking) and
/// compares each stage's artifact digest with the one stored for the same stage.
/// Stage names as a message lists them: `a`, `b`.
fn backticked<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn verify(
    pipeline: &PipelineArgs,
    store: &StoreArgs,
    only: &[String],
) -> Result<u8, Failure> {
    let p = load(pipeline)?;
    for s in only {
        if p.stage_index(s).is_none() {
            return Err(Failure::new(
                2,
                format!("error: no stage `{s}` in {}", p.path.display()),
            ));
        }
    }
    let stored = open_existing_store(&p, store)?;
    let plan = Plan::build(&p, &stored, &Default::default()).await?;
    // A stage with nothing stored under its key cannot be compared: verify refuses before
    // re-executing anything (possibly a whole training), rather than print "not stored"
    // and pass, which let a CI job pointed at the wrong or an empty store go green.
    let listed = |keep: &dyn Fn(&orchestrate::plan::StagePlan) -> bool| {
        backticked(
            plan.stages
                .iter()
                .filter(|sp| keep(sp))
                .map(|sp| sp.stage.as_str()),
        )
    };
    let unstored = listed(&|sp| {
        (only.is_empty() || only.contains(&sp.stage))
            && sp.status != orchestrate::plan::Status::Cached
    });
    if !unstored.is_empty() {
        // What a run would execute: the checked stages themselves, or what they wait on.
        let to_run = listed(&|sp| sp.status == orchestrate::plan::Status::WillRun);
        return Err(Failure::new(
            1,
            format!(
                "error: nothing stored to verify {unstored} against in {} (a run would execute {to_run}): run the pipeline first (`orchestrate run {}`), or verify stages that are stored (--stage S)",
                stored.url(),
                pipeline.file.display()
            ),
        ));
    }
    let scratch = std::env::temp_dir().join(format!("orchestrate-verify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| {
        Failure::new(
            1,
            format!("error: cannot create {}: {e}", scratch.display()),
        )
    })?;
    let exe = std::env::current_exe().map_err(|e| Failure::new(1, format!("error: {e}")))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("run").arg(&pipeline.file);
    for s in &pipeline.sets {
        cmd.arg("--set").arg(s);
    }
    // Only what the stages checked need is re-executed: `verify --stage tokenizer` need
    // not retrain the model.
    for s in only {
        cmd.arg("--until").arg(s);
    }
    let scratch_url = format!("file://{}", scratch.join("store").display());
    // No tracking: the pipeline's own `tracking.mlflow` would otherwise record (and
    // register) the scratch re-execution as if it were a run.
    cmd.args([
        "--store",
        &scratch_url,
        "--no-serve",
        "--quiet",
        "--no-tracking",
    ])
    .env("ORCHESTRATE_CACHE_DIR", scratch.join("cache"))
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null());
    errln!(
        "verify: re-executing {} into {}",
        if only.is_empty() {
            "every stage".to_string()
        } else {
            format!(
                "{} and what {}",
                only.join(", "),
                if only.len() == 1 {
                    "it needs"
                } else {
                    "they need"
                }
            )
        },
        scratch.display()
    );
    // Ctrl-C or SIGTERM stop the re-execution as they stop a run: each one this process
    // gets is passed on (the first stops it at a safe point, a second at once), and then
    // this process cleans up and exits 130. The re-execution has a process group of its
    // own, so a terminal's Ctrl-C reaches it once, from here. The handlers exist before
    // it starts, so no signal finds this process without them.
    use tokio::signal::unix::{signal, SignalKind};
    let watch = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| Failure::new(1, format!("error: cannot watch for {name}: {e}")))
    };
    let mut int = watch(SignalKind::interrupt(), "SIGINT")?;
    let mut term = watch(SignalKind::terminate(), "SIGTERM")?;
    let interrupted = || Failure::new(130, "verify: interrupted");
    let mut child = cmd
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Failure::new(1, format!("error: cannot start the re-execution: {e}")))?;
    let mut signalled = false;
    let status = loop {
        let signal = tokio::select! {
            status = child.wait() => break status,
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
        };
        signalled = true;
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }
    .map_err(|e| Failure::new(1, format!("error: cannot wait for the re-execution: {e}")))?;
    if signalled {
        let _ = std::fs::remove_dir_all(&scratch);
        return Err(interrupted());
    }
    let again = Store::open(&scratch_url, Path::new("."))?;
    let id = again.list_run_ids().await?.pop();
    let record: Option<RunRecord> = match id {
        Some(id) => again.get_run(&id).await?,
        None => None,
    };
    let record = match record {
        Some(record) if status.success() => record,
        failed_run => {
            let _ = std::fs::remove_dir_all(&scratch);
            if status.code() == Some(130) {
                return Err(interrupted());
            }
            return Err(reexecution_failed(status, failed_run.as_ref()));
        }
    };
    let mut differ = Vec::new();
    // Stages that differ because an input did (below one that differs): their own
    // determinism is not what was tested.
    let mut downstream = Vec::new();
    let mut unverified = Vec::new();
    outln!(
        "{:<16} {:<12} {:<16} {:<16}",
        "stage",
        "result",
        "stored",
        "re-executed"
    );
    for sp in &plan.stages {
        if !only.is_empty() && !only.contains(&sp.stage) {
            continue;
        }
        let original = match (&sp.status, &sp.key) {
            (orchestrate::plan::Status::Cached, Some(k)) => {
                stored.manifest(k).await?.map(|m| m.digest)
            }
            _ => None,
        };
        let again = record.stages.iter().find(|s| s.stage == sp.stage);
        let redone = again.and_then(|s| s.artifact.clone());
        // Its key names its inputs' digests: another key, other inputs.
        let same_inputs = again.is_some_and(|s| s.key == sp.key);
        let short = |d: &Option<String>| {
            d.as_deref()
                .map(orchestrate::plan::short_digest)
                .unwrap_or_else(|| "-".into())
        };
        let verdict = match (&original, &redone) {
            (Some(a), Some(b)) if a == b => "identical",
            (Some(_), Some(_)) if !same_inputs => {
                downstream.push(sp.stage.clone());
                "DIFFERS"
            }
            (Some(_), Some(_)) => {
                differ.push(sp.stage.clone());
                "DIFFERS"
            }
            // Checked above, but the store may have changed since (a gc, another run).
            (None, _) => {
                unverified.push(sp.stage.clone());
                "not stored"
            }
            (_, None) => {
                unverified.push(sp.stage.clone());
                "not re-run"
            }
        };
        outln!(
            "{:<16} {:<12} {:<16} {:<16}",
            sp.stage,
            verdict,
            short(&original),
            short(&redone)
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let named = |stages: &[String]| backticked(stages.iter().map(String::as_str));
    if !unverified.is_empty() {
        errln!("not verified: {} (nothing to compare)", named(&unverified));
    }
    if !downstream.is_empty() {
        errln!(
            "differ because their inputs did: {} (their own determinism is untested)",
            named(&downstream)
        );
    }
    if !differ.is_empty() {
        errln!(
            "not deterministic: {} (same inputs and parameters, different bytes)",
            named(&differ)
        );
    }
    if differ.is_empty() && downstream.is_empty() && unverified.is_empty() {
        Ok(0)
    } else {
        Ok(1)
    }
}

/// A re-execution that failed, with the stages that failed in it and why: it ran quietly,
/// and its scratch store (where its run record said so) is gone by now.
fn reexecution_failed(status: std::process::ExitStatus, run: Option<&RunRecord>) -> Failure {
    let failed: Vec<String> = run
        .iter()
        .flat_map(|r| &r.stages)
        .filter(|s| s.status == StageStatus::Failed)
        .map(|s| {
            let why = s
                .error
                .as_deref()
                .and_then(|e| e.lines().next())
                .unwrap_or("");
            format!("\n  stage `{}` failed on re-execution: {why}", s.stage)
        })
        .collect();
    Failure::new(
        1,
        format!(
            "error: the re-execution failed ({status}){}",
            failed.concat()
        ),
    )
}

fn exit_code(r: &RunRecord) -> u8 {
    match r.status {
        RunStatus::Succeeded => 0,
        RunStatus::Cancelled => 130,
        RunStatus::Running => 1,
        RunStatus::Failed => {
            let gate = r.stages.iter().any(|s| {
                s.status == StageStatus::Failed
                    && s.error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("quality gate failed"))
            });
            let store = r
                .stages
                .iter()
                .any(|s| s.status == StageStatus::Failed && s.store_error);
            if gate {
                4
            } else if store {
                3
            } else {
                1
            }
        }
    }
}

/// A run record as JSON, its status as the table shows it: a run whose process is gone
/// on this host is `killed`, not `running` for good.
fn run_json(r: &RunRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(r).expect("plain JSON");
    v["status"] = status_word(r).into();
    // (Other stage statuses keep their JSON names: `not_selected`, not the table's words.)
    for (s, json) in r
        .stages
        .iter()
        .zip(v["stages"].as_array_mut().into_iter().flatten())
    {
        if stage_status_word(r, s) == "killed" {
            json["status"] = "killed".into();
        }
    }
    v
}

/// A stage's status as `show` and `runs --json` give it: a killed run's stages at work
/// were killed with it.
fn stage_status_word(r: &RunRecord, s: &orchestrate::record::StageRecord) -> &'static str {
    match s.status {
        StageStatus::Running if r.killed_here() => "killed",
        other => other.as_str(),
    }
}

fn status_word(r: &RunRecord) -> &'static str {
    match r.status {
        RunStatus::Succeeded => "succeeded",
        RunStatus::Failed => "failed",
        RunStatus::Cancelled => "cancelled",
        RunStatus::Running if r.killed_here() => "killed",
        RunStatus::Running => "running",
    }
}

/// A run's duration; `≥` where it recorded no end (killed, or going on), its record
/// knowing only when its stages last started or ended.
fn run_duration(r: &RunRecord) -> String {
    let ms = fmt_ms(r.duration_ms());
    if r.ended_at.is_none() {
        format!("≥{ms}")
    } else {
        ms
    }
}

fn summary(r: &RunRecord) -> String {
    let mut out = format!(
        "run {} {} in {}: {} ran, {} cached, {} failed\n",
        r.id,
        status_word(r),
        run_duration(r),
        r.count(StageStatus::Ran),
        r.count(StageStatus::Cached),
        r.count(StageStatus::Failed)
    );
    out.push_str(&stage_table(r));
    out
}

fn stage_table(r: &RunRecord) -> String {
    let w = r
        .stages
        .iter()
        .map(|s| s.stage.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = format!(
        "{:<w$}  {:<12}  {:>8}  ARTIFACT\n",
        "STAGE", "STATUS", "TIME"
    );
    for s in &r.stages {
        // (A stage cancelled at work ran for a while too.)
        let worked = match s.status {
            StageStatus::Ran | StageStatus::Failed => true,
            StageStatus::Cancelled => s.duration_ms > 0,
            _ => false,
        };
        let time = if worked {
            fmt_ms(s.duration_ms)
        } else {
            "-".into()
        };
        let artifact = s
            .artifact
            .as_deref()
            .map(orchestrate::plan::short_digest)
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<w$}  {:<12}  {:>8}  {artifact}\n",
            s.stage,
            stage_status_word(r, s),
            time
        ));
        if let Some(e) = &s.error {
            // The last attempt's error; how many there were, where there were several.
            if s.attempts > 1 && s.status == StageStatus::Failed {
                out.push_str(&format!("{:<w$}    after {} attempts:\n", "", s.attempts));
            }
            for line in e.lines() {
                out.push_str(&format!("{:<w$}    {line}\n", ""));
            }
        }
    }
    out
}

fn runs_table(runs: &[RunRecord]) -> String {
    let mut out = format!(
        "{:<28}  {:<20}  {:<10}  {:>8}  {:>4}  {:>6}  {:>6}  PIPELINE\n",
        "RUN", "STARTED", "STATUS", "TIME", "RAN", "CACHED", "FAILED"
    );
    for r in runs {
        out.push_str(&format!(
            "{:<28}  {:<20}  {:<10}  {:>8}  {:>4}  {:>6}  {:>6}  {}\n",
            r.id,
            r.started_at.format("%Y-%m-%d %H:%M:%S"),
            status_word(r),
            run_duration(r),
            r.count(StageStatus::Ran),
            r.count(StageStatus::Cached),
            r.count(StageStatus::Failed),
            r.pipeline
        ));
    }
    out
}

fn show(r: &RunRecord) -> String {
    let mut out = format!("run       {}\n", r.id);
    out.push_str(&format!(
        "pipeline  {} ({}, digest {})\n",
        r.pipeline, r.pipeline_path, r.pipeline_digest
    ));
    out.push_str(&format!("status    {}\n", status_word(r)));
    out.push_str(&format!(
        "started   {} on {}\n",
        r.started_at.to_rfc3339(),
        r.host
    ));
    out.push_str(&format!("duration  {}\n", run_duration(r)));
    if let Some(c) = &r.git_commit {
        out.push_str(&format!("commit    {c}\n"));
    }
    out.push_str(&format!("command   orchestrate {}\n\n", r.args.join(" ")));
    out.push_str(&stage_table(r));
    out.push('\n');
    for s in &r.stages {
        if let Some(k) = &s.key {
            out.push_str(&format!("{}: key {}", s.stage, k));
            if let Some(p) = &s.produced_by {
                if s.status == StageStatus::Cached {
                    out.push_str(&format!(", produced by run {p}"));
                }
            }
            out.push('\n');
        }
        for (name, v) in &s.metrics {
            out.push_str(&format!("  {name} = {v}\n"));
        }
    }
    out
}

/// A run by id prefix, or `last`: the newest run (of `pipeline`, where given).
async fn resolve_run(store: &Store, run: &str, pipeline: Option<&str>) -> Result<String, Failure> {
    let ids = store.list_run_ids().await?;
    if run == "last" {
        for id in ids.iter().rev() {
            // A damaged record is nobody's last run.
            match store.get_run::<RunRecord>(id).await {
                Ok(Some(r)) if pipeline.is_none_or(|p| r.pipeline == p) => return Ok(id.clone()),
                Err(e) if !e.is_damage() => return Err(e.into()),
                _ => {}
            }
        }
        return Err(Failure::new(
            2,
            match pipeline {
                Some(pipeline) => {
                    format!("error: the store has no runs of pipeline `{pipeline}` yet")
                }
                None => "error: the store has no runs yet".to_string(),
            },
        ));
    }
    let mut matches: Vec<&String> = ids.iter().filter(|id| id.starts_with(run)).collect();
    if let Some(pipeline) = pipeline {
        // `--pipeline` narrows a prefix to that pipeline's runs, as it does `last`.
        let mut ours = Vec::new();
        for id in matches {
            if let Ok(Some(r)) = store.get_run::<RunRecord>(id).await {
                if r.pipeline == pipeline {
                    ours.push(id);
                }
            }
        }
        matches = ours;
    }
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Failure::new(
            2,
            format!("error: no run `{run}`; `orchestrate runs` lists them"),
        )),
        many => Err(Failure::new(
            2,
            format!(
                "error: `{run}` matches {} runs; give more of the id",
                many.len()
            ),
        )),
    }
}

/// What `pin`/`unpin` act on: who holds the pins (the run id, `last` resolved, or the key)
/// and the keys.
async fn keys_for(
    store: &Store,
    run_or_key: &str,
    pipeline: Option<&str>,
) -> Result<(String, Vec<orchestrate::key::CacheKey>), Failure> {
    let key = orchestrate::key::CacheKey(run_or_key.to_string());
    if run_or_key.len() == 64 && store.manifest(&key).await?.is_some() {
        return Ok((run_or_key.to_string(), vec![key]));
    }
    let id = match resolve_run(store, run_or_key, pipeline).await {
        Ok(id) => id,
        Err(e) => {
            // Run ids begin with their date, all hex digits: `20261207` is several runs'
            // prefix before it is a key's, and is answered so where no key begins with it.
            let runs_matched = store
                .list_run_ids()
                .await?
                .iter()
                .filter(|id| id.starts_with(run_or_key))
                .count();
            // Pins whose run record is gone (a store from before gc kept pinned runs'
            // records) are still that run's to remove.
            let held: Vec<_> = store
                .pin_holders()
                .await?
                .into_iter()
                .filter(|(_, holder)| holder == run_or_key)
                .map(|(key, _)| key)
                .collect();
            if !held.is_empty() {
                return Ok((run_or_key.to_string(), held));
            }
            // A cache key's first characters, as `show` and `plan --json` print keys.
            let hex = run_or_key.len() >= 8
                && run_or_key.len() <= 64
                && run_or_key.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex {
                return Err(e);
            }
            let keys: Vec<_> = store
                .list_manifest_keys()
                .await?
                .into_iter()
                .map(|(key, _)| key)
                .filter(|key| key.0.starts_with(run_or_key))
                .collect();
            return match keys.as_slice() {
                [key] => Ok((key.0.clone(), keys.clone())),
                [] if runs_matched > 1 => Err(e),
                [] => Err(Failure::new(
                    2,
                    format!("error: no run and no stored artifact whose cache key begins `{run_or_key}`; `orchestrate runs` lists runs, `orchestrate show RUN` their stages' keys"),
                )),
                _ => Err(Failure::new(
                    2,
                    format!("error: {} stored artifacts' cache keys begin `{run_or_key}`: give more of the key", keys.len()),
                )),
            };
        }
    };
    let record: RunRecord = store
        .get_run(&id)
        .await?
        .ok_or_else(|| Failure::new(2, format!("error: no run `{id}`")))?;
    // The artifacts the run produced or used: a stage that failed, or that the run never
    // reached, has a key but nothing under it, and pinning it would pin whatever a later
    // run stores there. Stages left out (`--only model`) whose artifacts were stored are
    // what the selected ones read: kept too, while they are still stored.
    let mut keys = Vec::new();
    for s in &record.stages {
        let used = match s.status {
            StageStatus::Ran | StageStatus::Cached => true,
            StageStatus::NotSelected => match (&s.key, &s.artifact) {
                (Some(key), Some(_)) => store.manifest(key).await?.is_some(),
                _ => false,
            },
            _ => false,
        };
        if used {
            keys.extend(s.key.clone());
        }
    }
    Ok((id, keys))
}
