//! Serving a Model artifact over HTTP (`orchestrate serve`), and the `deploy` stage that
//! checks a model serves before the pipeline calls it deployed.

pub mod api;
pub mod deploy;
mod docs;
pub mod engine;
pub mod metrics;
#[cfg(test)]
mod testkit;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use burn::prelude::Backend;
use orchestrate_model::artifact::{self, ModelCard};
use orchestrate_model::compute::{self, Compute, OnDevice};
use orchestrate_model::Tokenizer;

pub use api::Limits;

/// What the API needs to know about the model; the engine thread owns the weights.
pub struct ServedModel {
    pub name: String,
    pub digest: String,
    pub created: u64,
    pub card: ModelCard,
    /// Encodes user text: a prompt that spells a special token (`<eos>`) gets that text's
    /// tokens, never the token (`artifact::text_only`).
    pub tokenizer: Tokenizer,
    /// `cpu` or `cuda` (TGI's `model_device_type`).
    pub device: &'static str,
}

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// Name clients see (`model_id`, OpenAI's `model`).
    pub name: String,
    /// Content digest of the model artifact, shown as `model_sha`.
    pub digest: String,
    pub max_batch: usize,
    pub queue: usize,
    pub max_input_tokens: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub max_body_bytes: usize,
    pub api_key: Option<String>,
    /// The environment variable a deployment takes `api_key` from (its `api_key_env`):
    /// where it is set and `api_key` is still None, the variable was unset or empty, and
    /// `orchestrate serve` refuses to start open to anyone rather than quietly.
    pub key_from: Option<String>,
    pub cors_origins: Option<Vec<String>>,
    /// Where the model runs: `cpu`, `cuda`, `cuda:N` (a build with the `cuda` feature).
    pub device: String,
    /// Decoder workers, each decoding its own batch (see `engine`); 0: one per CPU core
    /// on the CPU, one on a GPU.
    pub workers: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            name: "model".into(),
            digest: String::new(),
            max_batch: 32,
            queue: 256,
            max_input_tokens: None,
            max_new_tokens: None,
            max_body_bytes: 64 * 1024,
            api_key: None,
            key_from: None,
            cors_origins: None,
            device: "cpu".into(),
            workers: 0,
        }
    }
}

/// Loads the model in `dir` and builds the router (no socket yet: tests drive it directly).
pub fn app(dir: &Path, opts: &ServeOptions) -> Result<axum::Router, String> {
    let compute = Compute::parse(&opts.device).map_err(|e| e.to_string())?;
    let (engine, metrics, model, limits) =
        compute::run_on(compute, Load { dir, opts, compute }).map_err(|e| e.to_string())??;
    let state = Arc::new(api::AppState {
        engine,
        metrics,
        model,
        limits,
        api_key: opts
            .api_key
            .as_ref()
            .map(|k| *blake3::hash(k.as_bytes()).as_bytes()),
    });
    Ok(api::router(state, opts.cors_origins.clone()))
}

/// Loading the weights onto the device and starting the decoder thread there.
struct Load<'a> {
    dir: &'a Path,
    opts: &'a ServeOptions,
    compute: Compute,
}

type Started = (
    engine::Engine,
    Arc<metrics::Metrics>,
    Arc<ServedModel>,
    Limits,
);

impl OnDevice for Load<'_> {
    type Output = Result<Started, String>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let Load { dir, opts, compute } = self;
        let lm = artifact::load::<B>(dir, &device).map_err(|e| e.to_string())?;
        // The position table the weights have, which `load` checked against the config.
        let max_len = lm.model.max_len();
        let limits = Limits {
            max_input_tokens: opts.max_input_tokens.unwrap_or(max_len).min(max_len),
            max_new_tokens: opts.max_new_tokens.unwrap_or(max_len).min(max_len),
            max_body_bytes: opts.max_body_bytes,
            max_stop_sequences: 4,
            max_batch: opts.max_batch,
            queue: opts.queue,
        };
        let metrics = Arc::new(metrics::Metrics::new(metrics::ModelInfo {
            model: opts.name.clone(),
            quantization: lm.card.quantization.as_str().to_string(),
            parameters: lm.card.parameters,
        }));
        let model = Arc::new(ServedModel {
            name: opts.name.clone(),
            digest: opts.digest.clone(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            card: lm.card.clone(),
            tokenizer: artifact::text_only(&lm.tokenizer),
            device: if compute.is_cuda() { "cuda" } else { "cpu" },
        });
        let workers = match (opts.workers, compute) {
            (0, Compute::Cpu) => std::thread::available_parallelism().map_or(1, |n| n.get()),
            (0, Compute::Cuda(_)) => 1,
            (n, _) => n,
        };
        let engine = engine::Engine::start(
            lm,
            device,
            workers,
            opts.max_batch,
            opts.queue,
            metrics.clone(),
        )?;
        Ok((engine, metrics, model, limits))
    }
}

/// Binds, calls `ready` with the address, and serves until `shutdown` resolves; requests in
/// flight are drained before it returns.
pub async fn serve(
    dir: &Path,
    opts: &ServeOptions,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let app = app(dir, opts)?;
    let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
        .await
        .map_err(|e| format!("cannot listen on {}:{}: {e}", opts.host, opts.port))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    ready(addr);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| format!("server error: {e}"))
}
