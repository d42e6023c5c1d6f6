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
use std::time::Duration;

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
    /// on the CPU, one on a GPU. Never more than `max_batch` (a worker with no row to hold
    /// would be idle, and the batch limit would be exceeded by rounding).
    pub workers: usize,
    /// How long a client may take to send a request's head, and then its body: a client
    /// that stalls mid-request would otherwise hold its connection, and a shutdown, forever.
    pub read_timeout: Duration,
    /// How long a shutdown waits for the requests in flight before it closes their
    /// connections anyway.
    pub drain_timeout: Duration,
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
            read_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Why `serve` did not start or stopped. `usage` errors come from the options (an address
/// that cannot be listened on, a device that does not exist here, a limit of 0), which the
/// command line reports as exit code 2; the others (a model that does not load) as 1.
#[derive(Debug)]
pub struct ServeError {
    pub usage: bool,
    pub message: String,
}

impl ServeError {
    fn usage(message: impl Into<String>) -> Self {
        ServeError {
            usage: true,
            message: message.into(),
        }
    }
    fn failed(message: impl Into<String>) -> Self {
        ServeError {
            usage: false,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServeError {}

impl From<ServeError> for String {
    fn from(e: ServeError) -> String {
        e.message
    }
}

/// What makes `key` one no client can send, if anything: HTTP carries it in a header, whose
/// value is trimmed and, past ASCII, has no agreed encoding, so a key with a space at either
/// end or another character would never match, and every request would be refused.
pub fn api_key_problem(key: &str) -> Option<&'static str> {
    let sendable = key.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && !key.starts_with(' ')
        && !key.ends_with(' ');
    (!sendable).then_some(
        "is not printable ASCII with no space at either end (clients send it in an HTTP header)",
    )
}

/// The most requests that may wait (`queue`) and be decoded together (`max_batch`): far
/// beyond any use, and below what the channels and counters behind them can hold.
pub const MAX_QUEUE: usize = 1 << 20;
pub const MAX_BATCH: usize = 1 << 16;
/// The longest `read_timeout` and `drain_timeout`: a day (the clock's arithmetic overflows
/// near 10^19 s, and a longer wait is not a timeout).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

impl ServeOptions {
    /// The options' own problems, before anything is loaded.
    pub fn check(&self) -> Result<Compute, ServeError> {
        // 0 would make a server that accepts nothing (queue) or decodes nothing (batch):
        // every request would be refused, so it is refused here instead.
        if self.max_batch == 0 {
            return Err(ServeError::usage(
                "max_batch must be at least 1 (requests decoded together)",
            ));
        }
        if self.queue == 0 {
            return Err(ServeError::usage(
                "queue must be at least 1 (requests that may wait for the decoder)",
            ));
        }
        if self.max_batch > MAX_BATCH || self.queue > MAX_QUEUE {
            return Err(ServeError::usage(format!(
                "max_batch may be at most {MAX_BATCH} and queue at most {MAX_QUEUE}, got {} and {}",
                self.max_batch, self.queue
            )));
        }
        for (name, t) in [
            ("read_timeout", self.read_timeout),
            ("drain_timeout", self.drain_timeout),
        ] {
            if t > MAX_TIMEOUT {
                return Err(ServeError::usage(format!(
                    "{name} may be at most a day (86400s), got {}s",
                    t.as_secs()
                )));
            }
        }
        // HTTP carries the key in a header, whose value is trimmed and, past ASCII, has no
        // agreed encoding: a key with spaces at its ends or other characters would never
        // match, and every request would be refused.
        if let Some(problem) = self.api_key.as_deref().and_then(api_key_problem) {
            return Err(ServeError::usage(format!("the API key {problem}")));
        }
        // Every request would be cut off before its head arrived.
        if self.read_timeout.is_zero() {
            return Err(ServeError::usage(
                "read_timeout must be more than 0 (the time a client has to send a request)",
            ));
        }
        let compute = Compute::parse(&self.device)
            .map_err(|e| ServeError::usage(format!("--device: {e}")))?;
        if let Compute::Cuda(n) = compute {
            // Its hint is for a pipeline stage (`resources.device`); here the device is
            // this command's option.
            compute::cuda_preflight(n).map_err(|e| {
                ServeError::usage(
                    e.replace("or set resources.device: cpu", "or serve with --device cpu"),
                )
            })?;
        }
        Ok(compute)
    }
}

/// Loads the model in `dir` and builds the router (no socket yet: tests drive it directly).
pub fn app(dir: &Path, opts: &ServeOptions) -> Result<axum::Router, ServeError> {
    let compute = opts.check()?;
    load(dir, opts, compute)
}

/// `app` for options already checked (`check` gave `compute`).
fn load(dir: &Path, opts: &ServeOptions, compute: Compute) -> Result<axum::Router, ServeError> {
    let (engine, metrics, model, limits) = compute::run_on(compute, Load { dir, opts, compute })
        .map_err(|e| ServeError::failed(e.to_string()))?
        .map_err(ServeError::failed)?;
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
            read_timeout: opts.read_timeout,
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
        // `Engine::start` keeps them to `max_batch`.
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
/// flight are drained before it returns, for `drain_timeout` at most.
pub async fn serve(
    dir: &Path,
    opts: &ServeOptions,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let compute = opts.check()?;
    // Bound before the model loads, so a busy port is said at once, not after the weights;
    // listening only after it has loaded, so that a connection meanwhile is refused (a
    // load balancer tries another server) rather than queued by the kernel to hang.
    let socket = bind(&opts.host, opts.port).await?;
    // A stop asked for while the model loads (SIGTERM from a scheduler, Ctrl-C) ends the
    // command then, not once a long load is over, and the server never says it serves.
    // (A thread of its own, not the runtime's blocking pool: the runtime waits for its pool
    // when it is dropped, and the command would then still end only once the load had.)
    let mut shutdown = Box::pin(shutdown);
    let (loaded_tx, loaded) = tokio::sync::oneshot::channel();
    {
        let (dir, opts) = (dir.to_path_buf(), opts.clone());
        std::thread::Builder::new()
            .name("model-load".into())
            .spawn(move || {
                let _ = loaded_tx.send(load(&dir, &opts, compute));
            })
            .map_err(|e| ServeError::failed(format!("cannot start loading the model: {e}")))?;
    }
    let app = tokio::select! {
        loaded = loaded => loaded.map_err(|_| ServeError::failed("loading the model failed without a word (the loader panicked)"))??,
        () = &mut shutdown => return Ok(()),
    };
    let listener = listen(socket, &opts.host, opts.port)?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServeError::failed(e.to_string()))?;
    ready(addr);
    accept(
        listener,
        app,
        shutdown,
        opts.read_timeout,
        opts.drain_timeout,
    )
    .await;
    Ok(())
}

fn cannot_listen(host: &str, port: u16, e: impl std::fmt::Display) -> ServeError {
    ServeError::usage(format!("cannot listen on {host}:{port}: {e}"))
}

/// A socket bound to the first of `host`'s addresses that takes it, not yet listening.
async fn bind(host: &str, port: u16) -> Result<tokio::net::TcpSocket, ServeError> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| cannot_listen(host, port, e))?;
    let mut last = None;
    for addr in addrs {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        };
        // As `TcpListener::bind` does: a restart need not wait out the old connections'
        // TIME_WAIT. Linux still refuses a port another socket listens on.
        let bound = socket.and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            Ok(s)
        });
        match bound {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => cannot_listen(host, port, e),
        None => cannot_listen(host, port, "the host has no address"),
    })
}

fn listen(
    socket: tokio::net::TcpSocket,
    host: &str,
    port: u16,
) -> Result<tokio::net::TcpListener, ServeError> {
    socket
        .listen(1024)
        .map_err(|e| cannot_listen(host, port, e))
}

/// Says a repeated error at most once a `every`: the first time, then with how many were
/// left unsaid since.
struct RateLimited {
    every: Duration,
    last: Option<std::time::Instant>,
    unsaid: u64,
}

impl RateLimited {
    fn new(every: Duration) -> Self {
        RateLimited {
            every,
            last: None,
            unsaid: 0,
        }
    }

    /// Whether to say this one now, and how many were left unsaid before it.
    fn say(&mut self, now: std::time::Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            self.unsaid += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unsaid))
    }
}

/// The accept loop. axum's own `serve` gives hyper no timer, so hyper's request-head
/// timeout never fires, and its graceful shutdown waits for every connection without
/// limit: one client that sent half a request kept the process alive after SIGTERM.
async fn accept(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    read_timeout: Duration,
    drain_timeout: Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let (closing, closed) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let mut accept_errors = RateLimited::new(Duration::from_secs(60));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            // Finished connections are reaped as they go, or the set would grow forever.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors, or a connection reset before it was taken: the
                // listener itself is fine. A pause keeps a persistent error from spinning.
                Err(e) => {
                    match accept_errors.say(std::time::Instant::now()) {
                        Some(0) => eprintln!("warning: cannot accept a connection: {e}"),
                        Some(n) => eprintln!(
                            "warning: cannot accept a connection: {e} ({n} more since the last warning)"
                        ),
                        None => {}
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut closed = closed.clone();
        conns.spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(read_timeout);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            // The connection first (`biased`): what a client has already sent is read
            // before a shutdown is seen, so a request sitting in the socket is answered
            // rather than dropped with the idle connections.
            tokio::select! {
                biased;
                _ = conn.as_mut() => return,
                _ = closed.wait_for(|c| *c) => conn.as_mut().graceful_shutdown(),
            }
            // Finishes the request in flight (an idle connection closes at once).
            let _ = conn.await;
        });
    }
    // No new connections; the open ones finish what they are answering.
    drop(listener);
    let _ = closing.send(true);
    let drained = tokio::time::timeout(drain_timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        eprintln!(
            "stopping: {} connection(s) still busy after {} s; closing them",
            conns.len(),
            drain_timeout.as_secs_f64()
        );
        conns.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{options, Server};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn connect(s: &Server) -> tokio::net::TcpStream {
        let addr = s.base.trim_start_matches("http://");
        tokio::net::TcpStream::connect(addr).await.unwrap()
    }

    /// A client that stopped halfway through a request's head.
    async fn half_a_head(s: &Server) -> tokio::net::TcpStream {
        let mut c = connect(s).await;
        c.write_all(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        c
    }

    /// A client that sent a head and stopped a few bytes into its 100-byte body.
    async fn part_of_a_body(s: &Server) -> tokio::net::TcpStream {
        let mut c = connect(s).await;
        c.write_all(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"inputs\"",
        )
        .await
        .unwrap();
        c
    }

    #[tokio::test]
    async fn a_client_stalled_mid_request_does_not_hold_shutdown_past_the_drain_deadline() {
        let s = Server::start(ServeOptions {
            // Longer than the test waits: only the drain deadline can end it.
            read_timeout: Duration::from_secs(600),
            drain_timeout: Duration::from_millis(500),
            ..options()
        })
        .await;
        let head = half_a_head(&s).await;
        let body = part_of_a_body(&s).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopped = tokio::time::timeout(Duration::from_secs(20), s.stop()).await;
        assert!(stopped.is_ok(), "shutdown waited for the stalled clients");
        drop((head, body));
    }

    #[tokio::test]
    async fn a_request_head_or_body_that_stalls_is_cut_off() {
        let s = Server::start(ServeOptions {
            // Long enough for a loaded machine to send the head in one go; short enough to
            // wait out twice.
            read_timeout: Duration::from_millis(1500),
            ..options()
        })
        .await;
        // Half a head: the connection is closed.
        let mut head = half_a_head(&s).await;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), head.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "the half-sent head held its connection");
        // A head and part of its body: 408, naming the body.
        let mut body = part_of_a_body(&s).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), body.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains(r#""field":"body""#), "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{text}"
        );
        s.stop().await;
    }

    #[test]
    fn limits_of_0_and_unknown_devices_are_usage_errors() {
        for opts in [
            ServeOptions {
                max_batch: 0,
                ..options()
            },
            ServeOptions {
                queue: 0,
                ..options()
            },
            ServeOptions {
                read_timeout: Duration::ZERO,
                ..options()
            },
            ServeOptions {
                device: "tpu".into(),
                ..options()
            },
        ] {
            let e = opts.check().unwrap_err();
            assert!(e.usage, "{e}");
        }
        // Without a GPU (or a build without CUDA), the hint is this command's option.
        let cuda = ServeOptions {
            device: "cuda".into(),
            ..options()
        };
        if let Err(e) = cuda.check() {
            assert!(e.usage && !e.message.contains("resources.device"), "{e}");
            if e.message.contains("no CUDA backend") {
                assert!(e.message.contains("--device cpu"), "{e}");
            }
        }
        // Where no GPU can run (a build without CUDA, or no GPU), it is refused.
        if orchestrate_model::compute::cuda_preflight(0).is_err() {
            let e = cuda.check().unwrap_err();
            assert!(e.usage, "{e}");
        }
        assert!(options().check().is_ok());
    }

    #[tokio::test]
    async fn a_port_in_use_is_a_usage_error() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let opts = ServeOptions {
            port: taken.local_addr().unwrap().port(),
            ..options()
        };
        let e = serve(testkit::model_dir(), &opts, |_| {}, async {})
            .await
            .unwrap_err();
        assert!(e.usage && e.message.contains("cannot listen"), "{e}");
    }

    #[tokio::test]
    async fn a_bound_port_refuses_connections_until_it_listens() {
        let socket = bind("127.0.0.1", 0).await.unwrap();
        let addr = socket.local_addr().unwrap();
        // As while the model loads: refused, not queued to hang.
        let e = tokio::net::TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        let listener = listen(socket, "127.0.0.1", addr.port()).unwrap();
        let (connected, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        connected.unwrap();
        accepted.unwrap();
        // A port another socket listens on is refused at bind, before any load.
        let e = bind("127.0.0.1", addr.port()).await.unwrap_err();
        assert!(e.usage && e.message.contains("cannot listen"), "{e}");
    }

    #[test]
    fn repeated_errors_are_said_at_most_once_a_period() {
        let mut said = RateLimited::new(Duration::from_secs(60));
        let t0 = std::time::Instant::now();
        assert_eq!(said.say(t0), Some(0));
        assert_eq!(said.say(t0 + Duration::from_secs(1)), None);
        assert_eq!(said.say(t0 + Duration::from_secs(59)), None);
        assert_eq!(said.say(t0 + Duration::from_secs(60)), Some(2));
        assert_eq!(said.say(t0 + Duration::from_secs(61)), None);
        assert_eq!(said.say(t0 + Duration::from_secs(200)), Some(1));
    }
}
