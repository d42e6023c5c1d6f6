//! The HTTP API: Text Generation Inference's routes and OpenAI's completion routes over one
//! engine, so clients of either work unchanged. Errors are JSON and name the field at fault:
//! TGI's shape (`{"error", "error_type"}`) on TGI routes, OpenAI's (`{"error": {"message",
//! "type", "param"}}`) under `/v1`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next as MwNext};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use orchestrate_model::generate::{Finish, Row, Sampling, MIN_TEMPERATURE};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::{Engine, Event, Job, Refused};
use crate::metrics::Metrics;
use crate::ServedModel;

/// Limits and switches of one server.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_input_tokens: usize,
    pub max_new_tokens: usize,
    pub max_body_bytes: usize,
    pub max_stop_sequences: usize,
    pub max_batch: usize,
    pub queue: usize,
    /// The longest a request's body may take to arrive after its head.
    pub read_timeout: Duration,
}

pub struct AppState {
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    pub model: Arc<ServedModel>,
    pub limits: Limits,
    /// blake3 of the API key: compared in constant time, never kept in clear.
    pub api_key: Option<[u8; 32]>,
}

type Shared = Arc<AppState>;

#[derive(Clone, Copy, PartialEq)]
enum Flavour {
    Tgi,
    OpenAi,
}

/// An error answer. Never a 500 for anything a client sends.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    field: Option<String>,
    openai: bool,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            field: None,
            openai: false,
        }
    }
    fn validation(field: &str, message: impl Into<String>) -> Self {
        let mut e = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", message);
        e.field = Some(field.to_string());
        e
    }
    fn too_large(field: &str, message: impl Into<String>) -> Self {
        let mut e = ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "validation", message);
        e.field = Some(field.to_string());
        e
    }
    fn flavour(mut self, f: Flavour) -> Self {
        self.openai = f == Flavour::OpenAi;
        self
    }
}

impl ApiError {
    /// The status, `type` and `code` the error is answered with. Under `/v1` a bad
    /// parameter (422 on TGI's routes) and a prompt over the limit (413) are OpenAI's 400
    /// `invalid_request_error`, the second with `code: context_length_exceeded`: OpenAI's
    /// clients raise `BadRequestError` for a 400 alone, and LangChain and LiteLLM recognise a
    /// prompt too long by that code. A body over the size limit stays a 413.
    fn answer(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        if !self.openai {
            return (self.status, self.kind, None);
        }
        let body_too_large = self.field.as_deref() == Some("body");
        match self.status {
            StatusCode::UNPROCESSABLE_ENTITY => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            StatusCode::PAYLOAD_TOO_LARGE if !body_too_large => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            StatusCode::BAD_REQUEST => (self.status, "invalid_request_error", None),
            _ => (self.status, self.kind, None),
        }
    }

    /// The JSON body, in the shape of the route's family.
    fn body(&self) -> Value {
        let (_, kind, code) = self.answer();
        if self.openai {
            json!({"error": {"message": self.message, "type": kind, "param": self.field, "code": code}})
        } else {
            json!({"error": self.message, "error_type": kind, "field": self.field})
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut r = (self.answer().0, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // RFC 9110: a 401 says which scheme it wants.
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // The rest of a body that came too slowly, or was too large, may still arrive (hyper
        // closes the connection after it): the connection cannot be reused, and the client
        // is told so.
        if self.status == StatusCode::REQUEST_TIMEOUT
            || (self.status == StatusCode::PAYLOAD_TOO_LARGE
                && self.field.as_deref() == Some("body"))
        {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

pub fn router(state: Shared, cors: Option<Vec<String>>) -> Router {
    let body_limit = state.limits.max_body_bytes;
    let mut app = Router::new()
        .route("/", post(compat_root))
        .route("/generate", post(generate))
        .route("/generate_stream", post(generate_stream))
        .route("/tokenize", post(tokenize))
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route("/docs", get(docs))
        .route("/openapi.json", get(openapi))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            read_body_in_time,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state);
    if let Some(origins) = cors {
        use tower_http::cors::{AllowOrigin, CorsLayer};
        // `*` is any origin; tower-http refuses it inside a list (a panic), and the others
        // have been checked by `cors_origin_problem` where they were given.
        let allow = if origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(origins.iter().filter_map(|o| o.parse::<HeaderValue>().ok()))
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                // Whatever the preflight asks for: SDKs add headers of their own (the OpenAI
                // one's `x-stainless-*`), and a fixed list would fail their preflights. (`*`
                // would not cover `Authorization`.)
                .allow_headers(tower_http::cors::AllowHeaders::mirror_request())
                // Readable by a page's script: a 429's `Retry-After` (SDKs back off by it),
                // a 401's `WWW-Authenticate`.
                .expose_headers([header::RETRY_AFTER, header::WWW_AUTHENTICATE]),
        );
    }
    app
}

/// What is wrong with `origin` as a CORS origin, if anything: browsers send
/// `scheme://host[:port]`, with no path and no trailing slash, and an origin written
/// otherwise would never match (before this check it was dropped without a word).
pub fn cors_origin_problem(origin: &str) -> Option<String> {
    if origin == "*" {
        return None;
    }
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    match rest {
        None => Some(format!(
            "`{origin}` is not an origin: expected `*` or scheme://host[:port], e.g. https://example.com"
        )),
        Some(host) if host.is_empty() || host.contains(['/', '?', '#', ' ']) => Some(format!(
            "`{origin}` is not an origin: scheme://host[:port] with no path or trailing slash"
        )),
        Some(_) if origin.parse::<HeaderValue>().is_err() => {
            Some(format!("`{origin}` cannot be sent in an HTTP header"))
        }
        Some(_) => None,
    }
}

/// Per-route request counts and latencies: to the whole answer, which for a stream is its
/// last event (its head leaves at once, before any token is decoded).
async fn observe(State(s): State<Shared>, req: Request, next: MwNext) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let streamed = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streamed {
        s.metrics.request(&route, status, false, started.elapsed());
        return resp;
    }
    // Recorded when the body is dropped: after its last event, or when the client left.
    // The status is the stream's own at its end: 503 when it ended with a failure event.
    let status = match resp.extensions().get::<StreamStatus>() {
        Some(StreamStatus(s)) => s.clone(),
        None => Arc::new(AtomicU16::new(status)),
    };
    let timer = StreamTimer {
        metrics: s.metrics.clone(),
        route,
        status,
        started,
    };
    let (parts, body) = resp.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _ = &timer;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

struct StreamTimer {
    metrics: Arc<Metrics>,
    route: String,
    status: Arc<AtomicU16>,
    started: Instant,
}

/// A stream's status as it goes, for `observe` to count when it ends: its head says 200,
/// but a stream that ends with the decoder's failure event failed (503).
#[derive(Clone)]
struct StreamStatus(Arc<AtomicU16>);

impl Drop for StreamTimer {
    fn drop(&mut self) {
        let status = self.status.load(Ordering::SeqCst);
        self.metrics
            .request(&self.route, status, true, self.started.elapsed());
    }
}

/// A body that did not arrive within `read_timeout` of its head.
#[derive(Debug)]
struct BodyTimeout(Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within {} s",
            self.0.as_secs_f64()
        )
    }
}

impl std::error::Error for BodyTimeout {}

/// Gives the body a deadline: a client that sends a head and then stalls would otherwise
/// hold its handler, and a graceful shutdown, for as long as it likes. The handler then
/// answers 408 (`parse`).
async fn read_body_in_time(State(s): State<Shared>, req: Request, next: MwNext) -> Response {
    let limit = s.limits.read_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    let (parts, body) = req.into_parts();
    let timed = stream::unfold(Some(body.into_data_stream()), move |data| async move {
        let mut data = data?;
        match tokio::time::timeout_at(deadline, data.next()).await {
            Ok(Some(chunk)) => Some((chunk, Some(data))),
            Ok(None) => None,
            Err(_) => Some((Err(axum::Error::new(BodyTimeout(limit))), None)),
        }
    });
    next.run(Request::from_parts(parts, Body::from_stream(timed)))
        .await
}

/// `Authorization: Bearer KEY` or `X-API-Key: KEY` when a key is set; /health and /metrics
/// stay open for probes and scrapers, /docs and /openapi.json for people (a browser opening
/// the page sends no key, and the description holds nothing secret).
async fn authorize(State(s): State<Shared>, req: Request, next: MwNext) -> Response {
    let Some(want) = s.api_key else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if matches!(path, "/health" | "/metrics" | "/docs" | "/openapi.json") {
        return next.run(req).await;
    }
    let h = req.headers();
    // Either header may hold the key: huggingface_hub sends the machine's own Hugging Face
    // token as `Authorization: Bearer` beside the `X-API-Key` its caller set.
    let bearer = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let x_api_key = h.get("x-api-key").and_then(|v| v.to_str().ok());
    let matches = |k: &str| constant_time_eq(blake3::hash(k.as_bytes()).as_bytes(), &want);
    let ok = bearer.is_some_and(matches) | x_api_key.is_some_and(matches);
    if ok {
        return next.run(req).await;
    }
    let openai = is_openai_path(path);
    let mut e = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong API key (Authorization: Bearer KEY, or X-API-Key)",
    );
    e.openai = openai;
    e.into_response()
}

/// The credentials of `Bearer KEY`: the scheme is case-insensitive (RFC 9110 11.1), so
/// `bearer KEY` is the same.
fn bearer_token(v: &str) -> Option<&str> {
    let (scheme, key) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim_start_matches(' '))
}

/// Equal-length comparison whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Under /v1 in OpenAI's shape, as that family's other errors.
async fn not_found(uri: axum::http::Uri) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /docs",
    );
    e.openai = is_openai_path(uri.path());
    e
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not take {method}; see /docs", uri.path()),
    );
    e.openai = is_openai_path(uri.path());
    e
}

fn is_openai_path(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

/// Parses a JSON body, naming the field at fault.
fn parse<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    f: Flavour,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        let e = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large("body", "request body too large")
        } else if let Some(t) = timed_out(&r) {
            let mut e = ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout", t.to_string());
            e.field = Some("body".into());
            e
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "validation",
                format!("cannot read the body: {r}"),
            )
        };
        e.flavour(f)
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    let not_json = |inner: serde_json::Error| {
        // The message says where: "... at line 1 column 12".
        let mut err = ApiError::new(
            StatusCode::BAD_REQUEST,
            "validation",
            format!("body is not valid JSON: {inner}"),
        );
        err.field = Some("body".into());
        err.flavour(f)
    };
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // `1e400` is well-formed JSON that serde_json files under syntax: its value, not the
        // body, is at fault, so it is answered as any other bad value, naming the field.
        let out_of_range = inner.to_string().starts_with("number out of range");
        if (inner.is_syntax() || inner.is_eof()) && !(out_of_range && path != ".") {
            not_json(inner)
        } else {
            ApiError::validation(&error_field(&path, &inner), inner.to_string()).flavour(f)
        }
    })?;
    // One document: `{...} junk` or `{...}{...}` is not a request to read the first of.
    de.end().map_err(not_json)?;
    Ok(value)
}

/// The deadline of `read_body_in_time`, if that is what cut the body short.
fn timed_out(r: &BytesRejection) -> Option<&BodyTimeout> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(r);
    while let Some(e) = cause {
        if let Some(t) = e.downcast_ref::<BodyTimeout>() {
            return Some(t);
        }
        cause = e.source();
    }
    None
}

/// The field a deserialization error is about. A missing field is named only in serde's
/// message (`missing field `inputs``); the path is then the object that lacks it.
fn error_field(path: &str, e: &serde_json::Error) -> String {
    let message = e.to_string();
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|m| m.split('`').next());
    match (path, missing) {
        (".", Some(field)) => field.to_string(),
        (_, Some(field)) => format!("{path}.{field}"),
        (".", None) => "body".into(),
        (_, None) => path.to_string(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Parameters {
    pub max_new_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    /// Locally typical sampling's mass (LangChain's TGI wrapper sends 0.95 by default).
    pub typical_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub details: bool,
    pub do_sample: bool,
    pub best_of: Option<i64>,
    pub author: Option<String>,
    pub lang: Option<String>,
    /// Decode all `max_new_tokens` even past the end-of-text token (as vLLM's parameter of
    /// that name): for benchmarks that need a fixed length.
    pub ignore_eos: bool,
    /// TGI's: keep only the prompt's last `truncate` tokens (the control tokens stay).
    pub truncate: Option<i64>,
    /// TGI's: `generated_text` starts with the prompt as given.
    pub return_full_text: Option<bool>,
    /// TGI parameters this server does not implement: refused by name where they ask for
    /// something (see `Parameters::unsupported`), not dropped, or a client would take unconstrained
    /// or greedy text for what it asked.
    pub grammar: Option<Value>,
    pub watermark: Option<Value>,
    pub top_n_tokens: Option<Value>,
    pub decoder_input_details: Option<Value>,
    pub frequency_penalty: Option<Value>,
    pub adapter_id: Option<Value>,
}

impl Parameters {
    /// The first TGI parameter set to something this server does not do: its name and
    /// value. Null, and the value that changes nothing, are taken.
    fn unsupported(&self) -> Option<(&'static str, &Value)> {
        let fields: [(&'static str, &Option<Value>); 6] = [
            ("grammar", &self.grammar),
            ("watermark", &self.watermark),
            ("top_n_tokens", &self.top_n_tokens),
            ("decoder_input_details", &self.decoder_input_details),
            ("frequency_penalty", &self.frequency_penalty),
            ("adapter_id", &self.adapter_id),
        ];
        fields.into_iter().find_map(|(name, value)| {
            let value = value.as_ref()?;
            let asks_nothing = match (name, value) {
                (_, Value::Null) => true,
                ("top_n_tokens" | "frequency_penalty", Value::Number(n)) => n.as_f64() == Some(0.0),
                ("watermark" | "decoder_input_details", Value::Bool(b)) => !b,
                ("adapter_id", Value::String(t)) => t.is_empty(),
                _ => false,
            };
            (!asks_nothing).then_some((name, value))
        })
    }
}

/// The repetition penalties taken, both ends included.
const REPETITION_PENALTY: (f64, f64) = (0.001, 1000.0);

/// The control tokens `artifact::prompt_ids` puts before the prompt's text: language and
/// author. `truncate` never cuts them.
const CONTROL_TOKENS: usize = 2;

#[derive(Debug, Deserialize)]
pub struct GenerateRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: Parameters,
    #[serde(default, deserialize_with = "false_if_null")]
    pub stream: bool,
}

/// What a route calls the fields `prepare` checks, for its errors to name.
#[derive(Clone, Copy)]
struct Names {
    /// Before each parameter's name: `parameters.` (TGI) or nothing (OpenAI).
    prefix: &'static str,
    /// The token budget: `max_new_tokens`, `max_tokens` or `max_completion_tokens`.
    max_new_tokens: &'static str,
    /// The text: `inputs`, `prompt` or `messages`.
    prompt: &'static str,
}

const TGI_NAMES: Names = Names {
    prefix: "parameters.",
    max_new_tokens: "max_new_tokens",
    prompt: "inputs",
};

/// A validated request, ready for the engine.
struct Prepared {
    row: Row,
    stop: Vec<String>,
    warnings: Vec<String>,
    seed: Option<u64>,
}

/// A seed for a request that gives none: the clock and a count of the seeds made, so that
/// two requests in one clock tick (a coarse clock) do not sample alike.
fn fresh_seed() -> u64 {
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mix = orchestrate_model::data::mix;
    mix(t as u64 ^ mix(n))
}

impl AppState {
    fn prepare(
        &self,
        prompt: &str,
        p: &Parameters,
        names: Names,
        sampling_default: bool,
    ) -> Result<Prepared, ApiError> {
        let field = |name: &str| format!("{}{name}", names.prefix);
        if let Some((name, value)) = p.unsupported() {
            return Err(ApiError::validation(
                &field(name),
                format!("`{name}` = {value} is not supported by this server"),
            ));
        }
        let l = &self.limits;
        let max_new = p.max_new_tokens.unwrap_or(50.min(l.max_new_tokens as i64));
        if max_new < 1 {
            return Err(ApiError::validation(
                &field(names.max_new_tokens),
                format!("must be at least 1, got {max_new}"),
            ));
        }
        if max_new as usize > l.max_new_tokens {
            return Err(ApiError::validation(
                &field(names.max_new_tokens),
                format!("{max_new} is over the limit of {}", l.max_new_tokens),
            ));
        }
        // Decoding is in f32: a value finite in JSON's f64 but not in f32 (1e300) would
        // reach it as inf.
        if let Some(t) = p.temperature {
            if !t.is_finite() || t < 0.0 || !(t as f32).is_finite() {
                return Err(ApiError::validation(
                    &field("temperature"),
                    format!("must be a number from 0 to {:e}, got {t}", f32::MAX),
                ));
            }
        }
        if let Some(k) = p.top_k {
            if k < 1 {
                return Err(ApiError::validation(
                    &field("top_k"),
                    format!("must be at least 1, got {k}"),
                ));
            }
        }
        for (name, value) in [("top_p", p.top_p), ("typical_p", p.typical_p)] {
            if let Some(v) = value {
                if !(v > 0.0 && v <= 1.0) {
                    return Err(ApiError::validation(
                        &field(name),
                        format!("must be in (0, 1], got {v}"),
                    ));
                }
            }
        }
        if let Some(r) = p.repetition_penalty {
            // Scores are divided or multiplied by it in f32: far from 1 it turns them into
            // infinities (and sampling's probabilities into NaN) while meaning nothing a
            // penalty of 1000 does not already say.
            if !(REPETITION_PENALTY.0..=REPETITION_PENALTY.1).contains(&r) {
                return Err(ApiError::validation(
                    &field("repetition_penalty"),
                    format!(
                        "must be a number from {} to {}, got {r}",
                        REPETITION_PENALTY.0, REPETITION_PENALTY.1
                    ),
                ));
            }
        }
        if p.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::validation(
                &field("best_of"),
                "only best_of = 1 is supported",
            ));
        }
        if p.stop.len() > l.max_stop_sequences {
            return Err(ApiError::validation(
                &field("stop"),
                format!("at most {} stop sequences", l.max_stop_sequences),
            ));
        }
        let m = &self.model;
        let lang = match &p.lang {
            Some(lang) if m.card.specials.langs.contains_key(lang) => lang.clone(),
            Some(lang) => {
                let known: Vec<&String> = m.card.specials.langs.keys().collect();
                return Err(ApiError::validation(
                    &field("lang"),
                    format!("unknown language `{lang}`; this model knows {known:?}"),
                ));
            }
            None => match guess_lang(prompt) {
                // A model trained without such records may lack the token: English, then.
                "other" if !m.card.specials.langs.contains_key("other") => "en".to_string(),
                guess => guess.to_string(),
            },
        };
        // A full queue refuses before the tokenizer runs, not after: under overload every
        // refused request would otherwise still pay for its prompt's tokens (up to the body
        // limit's worth) on the threads /health and /metrics answer from.
        if self.engine.is_full() {
            return Err(self.busy());
        }
        let (prompt_ids, known) = orchestrate_model::artifact::prompt_ids(
            &m.tokenizer,
            &m.card.specials,
            prompt,
            &lang,
            p.author.as_deref(),
        )
        .map_err(|e| ApiError::validation(names.prompt, format!("cannot tokenize: {e}")))?;
        let mut prompt_ids = prompt_ids;
        if let Some(keep) = p.truncate {
            if keep < 1 {
                return Err(ApiError::validation(
                    &field("truncate"),
                    format!("must be at least 1, got {keep}"),
                ));
            }
            if keep as usize > l.max_input_tokens {
                return Err(ApiError::validation(
                    &field("truncate"),
                    format!(
                        "must be at most max_input_tokens ({}), got {keep}",
                        l.max_input_tokens
                    ),
                ));
            }
            // TGI keeps the end of a long prompt: the text the reply continues. A client
            // sets `truncate` from /info's `max_input_tokens`, and TGI accepts every prompt so
            // cut: the control tokens fit within it where they would not beside it.
            let keep = (keep as usize).min(l.max_input_tokens.saturating_sub(CONTROL_TOKENS));
            let text = prompt_ids.len().saturating_sub(CONTROL_TOKENS);
            let cut = text.saturating_sub(keep);
            prompt_ids.drain(CONTROL_TOKENS..CONTROL_TOKENS + cut);
        }
        if prompt_ids.len() > l.max_input_tokens {
            return Err(ApiError::too_large(
                names.prompt,
                format!(
                    "the prompt is {} tokens with its control tokens; the limit is {}",
                    prompt_ids.len(),
                    l.max_input_tokens
                ),
            ));
        }
        let mut warnings = Vec::new();
        if !known {
            warnings.push(format!(
                "author `{}` is not among the model's authors: used `other`",
                p.author.as_deref().unwrap_or_default()
            ));
        }
        // A temperature of 0 is the limit of sampling: the likeliest token, whatever else is
        // asked (OpenAI's clients send `temperature: 0` beside their usual `top_p`). So is
        // one below `MIN_TEMPERATURE`, where sampling would pick the likeliest token anyway.
        // A nucleus that is 0 in f32 (top_p = 1e-50) holds the likeliest token alone too;
        // the decoder would read 0 as no nucleus at all and sample from everything.
        let cold = p.temperature.is_some_and(|t| (t as f32) < MIN_TEMPERATURE)
            || p.top_p.is_some_and(|t| (t as f32) <= 0.0);
        // TGI samples when asked (`do_sample`) or when any warper changes the distribution
        // (its `NextTokenChooser`: `sampling = do_sample or has_warpers`): a temperature
        // other than 1, top_k, top_p below 1. A temperature of exactly 1 changes nothing and
        // leaves it greedy. OpenAI (`sampling_default`) samples at any temperature above 0.
        let warm = |t: f64| t > 0.0 && (sampling_default || t != 1.0);
        let sample = !cold
            && (p.do_sample
                || p.top_k.is_some()
                || p.top_p.is_some_and(|t| t < 1.0)
                || p.typical_p.is_some_and(|t| t < 1.0)
                || p.temperature.map_or(sampling_default, warm));
        let seed = sample.then(|| p.seed.unwrap_or_else(fresh_seed));
        let sampling = if sample {
            Sampling {
                temperature: p.temperature.filter(|t| *t > 0.0).unwrap_or(1.0) as f32,
                top_k: p.top_k.map(|k| k as usize),
                top_p: p.top_p.map(|t| t as f32),
                typical_p: p.typical_p.map(|t| t as f32),
                repetition_penalty: p.repetition_penalty.map(|r| r as f32),
                seed: seed.unwrap_or(0),
            }
        } else {
            Sampling {
                repetition_penalty: p.repetition_penalty.map(|r| r as f32),
                ..Sampling::default()
            }
        };
        Ok(Prepared {
            row: Row {
                src: prompt_ids,
                sampling,
                max_new_tokens: max_new as usize,
                ignore_eos: p.ignore_eos,
            },
            // In NFC, as prompts are and as the model learned its text: a stop typed
            // decomposed (macOS's `cafe\u{301}`) would never match what it writes.
            stop: p
                .stop
                .iter()
                .map(|s| orchestrate_model::artifact::prompt_text(s).into_owned())
                .collect(),
            warnings,
            seed,
        })
    }

    /// The answer to a request the queue has no room for.
    fn busy(&self) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!(
                "the queue is full ({} waiting); retry shortly",
                self.limits.queue
            ),
        )
    }

    fn submit(
        &self,
        prep: &Prepared,
        f: Flavour,
    ) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job {
            row: prep.row.clone(),
            stop: prep.stop.clone(),
            events: tx,
            queued: Instant::now(),
        };
        self.engine.submit(job).map(|()| rx).map_err(|r| {
            match r {
                Refused::Busy => self.busy(),
                Refused::Stopped => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the decoder has stopped",
                ),
            }
            .flavour(f)
        })
    }
}

/// Cyrillic letters mean Russian, Latin ones English; letters of neither (`你好`, `Γειά`)
/// the corpus's `other`; no letters at all (`12345`) English. The caller can say.
fn guess_lang(text: &str) -> &'static str {
    let (mut cyr, mut latin, mut others) = (0, 0, 0);
    for c in text.chars() {
        if matches!(c, 'а'..='я' | 'А'..='Я' | 'ё' | 'Ё') {
            cyr += 1;
        } else if c.is_ascii_alphabetic() {
            latin += 1;
        } else if c.is_alphabetic() {
            others += 1;
        }
    }
    if cyr > latin {
        "ru"
    } else if latin == 0 && others > 0 {
        "other"
    } else {
        "en"
    }
}

struct Collected {
    text: String,
    finish: Finish,
    tokens: Vec<Value>,
    count: usize,
}

async fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Collected, ApiError> {
    let mut tokens = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token {
                token,
                piece,
                special_id,
                ..
            } => {
                // Special where its own text is empty (see `Event::Token`).
                let special = special_id && piece.is_empty();
                tokens.push(json!({"id": token.id, "text": piece, "logprob": token.logprob, "special": special}));
            }
            Event::Done {
                finish,
                tokens: ids,
                text,
            } => {
                return Ok(Collected {
                    text,
                    finish,
                    count: ids.len(),
                    tokens,
                });
            }
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the decoder stopped",
    ))
}

fn tgi_finish(f: Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        Finish::EosToken => "eos_token",
        Finish::StopSequence | Finish::Cancelled => "stop_sequence",
    }
}

fn openai_finish(f: Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        _ => "stop",
    }
}

impl AppState {
    fn details(
        &self,
        prompt_ids: &[u32],
        warnings: &[String],
        seed: Option<u64>,
        c: &Collected,
    ) -> Value {
        let prefill: Vec<Value> = prompt_ids
            .iter()
            // Decoded, not the vocabulary's byte-level symbol (`Ġis` for " is").
            .map(|id| json!({"id": id, "text": self.model.tokenizer.decode(&[*id], false).unwrap_or_default(), "logprob": null}))
            .collect();
        json!({
            "finish_reason": tgi_finish(c.finish),
            "generated_tokens": c.count,
            "seed": seed,
            "prefill": prefill,
            "tokens": c.tokens,
            "warnings": warnings,
        })
    }
}

async fn run_tgi(s: &Shared, req: GenerateRequest) -> Result<Value, ApiError> {
    let prep = s.prepare(&req.inputs, &req.parameters, TGI_NAMES, false)?;
    let rx = s.submit(&prep, Flavour::Tgi)?;
    let c = collect(rx).await?;
    let mut v = json!({"generated_text": format!("{}{}", full_text_prefix(&req), c.text)});
    if req.parameters.details {
        v["details"] = s.details(&prep.row.src, &prep.warnings, prep.seed, &c);
    }
    if !prep.warnings.is_empty() {
        v["warnings"] = json!(prep.warnings);
    }
    Ok(v)
}

/// What goes before the reply in `generated_text`: under TGI's `return_full_text`, the
/// prompt as given (before `truncate`), else nothing.
fn full_text_prefix(req: &GenerateRequest) -> &str {
    match req.parameters.return_full_text {
        Some(true) => &req.inputs,
        _ => "",
    }
}

async fn generate(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: GenerateRequest = parse(body, Flavour::Tgi)?;
    Ok(Json(run_tgi(&s, req).await?))
}

/// TGI's `/`: the reply wrapped in an array, or a stream when `stream: true`.
async fn compat_root(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: GenerateRequest = parse(body, Flavour::Tgi)?;
    if req.stream {
        return stream_tgi(&s, req);
    }
    Ok(Json(json!([run_tgi(&s, req).await?])).into_response())
}

async fn generate_stream(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: GenerateRequest = parse(body, Flavour::Tgi)?;
    stream_tgi(&s, req)
}

/// Server-sent events, one per string of `events` (each a JSON document, or `[DONE]`).
/// `X-Accel-Buffering: no` tells nginx to pass each event on as it comes, whatever its
/// `proxy_buffering` says.
fn sse(events: impl Stream<Item = String> + Send + 'static) -> Response {
    let status = Arc::new(AtomicU16::new(StatusCode::OK.as_u16()));
    let seen = status.clone();
    let failures = [stream_failed(Flavour::Tgi), stream_failed(Flavour::OpenAi)];
    let events = events.map(move |data| {
        if failures.contains(&data) {
            seen.store(StatusCode::SERVICE_UNAVAILABLE.as_u16(), Ordering::SeqCst);
        }
        Ok::<_, Infallible>(SseEvent::default().data(data))
    });
    let mut r = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    r.headers_mut().insert(
        header::HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    r.extensions_mut().insert(StreamStatus(status));
    r
}

/// One event per token; the last also carries `generated_text`, `details` (when asked)
/// and `warnings` (when there are any), as `/generate`'s reply does.
fn stream_tgi(s: &Shared, req: GenerateRequest) -> Result<Response, ApiError> {
    let prep = s.prepare(&req.inputs, &req.parameters, TGI_NAMES, false)?;
    let rx = s.submit(&prep, Flavour::Tgi)?;
    let tail = TgiTail {
        details: req.parameters.details,
        seed: prep.seed,
        input_length: prep.row.src.len(),
        warnings: prep.warnings,
        prefix: full_text_prefix(&req).to_string(),
    };
    Ok(sse(tgi_events(rx, tail)))
}

/// What a TGI stream's last event says besides the engine's summary.
struct TgiTail {
    details: bool,
    seed: Option<u64>,
    /// The prompt's tokens, control tokens included (TGI's stream details have it).
    input_length: usize,
    warnings: Vec<String>,
    /// Before `generated_text`: the prompt under `return_full_text`, else nothing.
    prefix: String,
}

/// The event a stream ends with when the decoder stopped before the request's end (a
/// failed step): without it the client would take a cut-short text for the whole one.
fn stream_failed(f: Flavour) -> String {
    let e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the decoder stopped before the end of this request",
    )
    .flavour(f);
    e.body().to_string()
}

/// Each token is sent as it comes. The engine marks a request's last token, and its
/// summary (`Event::Done`) follows in the same step: the last token waits for it alone, so
/// that one event carries both.
fn tgi_events(
    rx: mpsc::UnboundedReceiver<Event>,
    tail: TgiTail,
) -> impl Stream<Item = String> + Send + 'static {
    let tail = Arc::new(tail);
    stream::unfold(Some(rx), move |rx| {
        let tail = tail.clone();
        async move {
            let mut rx = rx?;
            let mut ev = match rx.recv().await {
                Some(Event::Token {
                    token,
                    text,
                    special_id,
                    last,
                    ..
                }) => {
                    // Special where the text sent with it is empty (see `Event::Token`).
                    let special = special_id && text.is_empty();
                    let t = json!({"id": token.id, "text": text, "logprob": token.logprob, "special": special});
                    let ev = json!({"index": token.index + 1, "token": t, "generated_text": null, "details": null});
                    if !last {
                        return Some((vec![ev.to_string()], Some(rx)));
                    }
                    ev
                }
                // A request that ended with no token of its own to carry the summary.
                Some(done @ Event::Done { .. }) => {
                    let mut ev = json!({"index": 0, "token": null, "generated_text": null, "details": null});
                    summarize(&mut ev, done, &tail);
                    return Some((vec![ev.to_string()], None));
                }
                None => return Some((vec![stream_failed(Flavour::Tgi)], None)),
            };
            let done = rx.recv().await;
            let failed = !matches!(done, Some(Event::Done { .. }));
            if let Some(done) = done {
                summarize(&mut ev, done, &tail);
            }
            // A token decoded before a failure is still sent, then the failure.
            let mut out = vec![ev.to_string()];
            if failed {
                out.push(stream_failed(Flavour::Tgi));
            }
            Some((out, None))
        }
    })
    .flat_map(stream::iter)
}

/// Puts the engine's summary (`Event::Done`) into a stream's last event.
fn summarize(ev: &mut Value, done: Event, tail: &TgiTail) {
    let Event::Done {
        finish,
        tokens,
        text,
    } = done
    else {
        return;
    };
    ev["generated_text"] = json!(format!("{}{text}", tail.prefix));
    if !tail.warnings.is_empty() {
        ev["warnings"] = json!(tail.warnings);
    }
    if tail.details {
        // As `/generate`'s details, less `prefill` and `tokens`: the stream sent those.
        ev["details"] = json!({
            "finish_reason": tgi_finish(finish),
            "generated_tokens": tokens.len(),
            "seed": tail.seed,
            "input_length": tail.input_length,
            "warnings": tail.warnings,
        });
    }
}

#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    inputs: String,
}

async fn tokenize(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: TokenizeRequest = parse(body, Flavour::Tgi)?;
    // As /generate reads it (in NFC), so the tokens and their count are the ones its limit
    // counts; the offsets index that text (the same as the input's, unless it was not NFC).
    let text = orchestrate_model::artifact::prompt_text(&req.inputs);
    let enc = s
        .model
        .tokenizer
        .encode(text.as_ref(), false)
        .map_err(|e| ApiError::validation("inputs", format!("cannot tokenize: {e}")))?;
    let out: Vec<Value> = enc
        .get_ids()
        .iter()
        .zip(enc.get_offsets())
        .map(|(id, (a, b))| json!({"id": id, "text": text.get(*a..*b).unwrap_or(""), "start": a, "stop": b}))
        .collect();
    Ok(Json(json!(out)))
}

/// 200 while the model is loaded and a decoder takes requests; 503 once none does (every
/// request would be answered 503), so a load balancer or orchestrator stops sending here.
async fn health(State(s): State<Shared>) -> Response {
    if s.engine.alive() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        let body = json!({"status": "failed", "error": "the decoder has stopped"});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

async fn info(State(s): State<Shared>) -> Json<Value> {
    let m = &s.model;
    let l = &s.limits;
    Json(json!({
        "model_id": m.name,
        "model_sha": m.digest,
        "model_dtype": m.card.quantization.as_str(),
        "model_device_type": m.device,
        "model_pipeline_tag": "text2text-generation",
        // Those waiting in the queue and those decoding: one more is refused with 429.
        "max_concurrent_requests": l.queue + l.max_batch,
        "max_best_of": 1,
        "max_stop_sequences": l.max_stop_sequences,
        "max_input_tokens": l.max_input_tokens,
        // The encoder reads the prompt and the decoder writes the reply, each in its own
        // positions, so the two limits are separate: a request holds at most their sum,
        // but a short prompt does not leave room for more than `max_new_tokens` of reply
        // (TGI clients that take `max_total - prompt` as the reply's budget would be
        // refused), hence `max_new_tokens` beside it.
        "max_total_tokens": l.max_input_tokens + l.max_new_tokens,
        "max_new_tokens": l.max_new_tokens,
        "max_batch_size": l.max_batch,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "orchestrate",
        "version": env!("CARGO_PKG_VERSION"),
        "parameters": m.card.parameters,
        "config": m.card.config,
        "languages": m.card.specials.langs.keys().collect::<Vec<_>>(),
        "authors": m.card.specials.authors.keys().collect::<Vec<_>>(),
    }))
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(s.engine.queue_depth()),
    )
}

async fn docs() -> Html<&'static str> {
    Html(crate::docs::PAGE)
}

async fn openapi() -> Json<Value> {
    Json(crate::docs::openapi())
}

fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn models(State(s): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&s)]}))
}

fn model_object(s: &Shared) -> Value {
    json!({"id": s.model.name, "object": "model", "created": s.model.created, "owned_by": "orchestrate"})
}

/// OpenAI's `GET /v1/models/{id}` (`client.models.retrieve`): the one model, by its name.
async fn model(
    State(s): State<Shared>,
    id: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    // A name that is not UTF-8 once decoded (`%FF`): OpenAI's JSON, not axum's plain text.
    let axum::extract::Path(id) = id.map_err(|e| {
        ApiError::validation("model", format!("not a model name: {e}")).flavour(Flavour::OpenAi)
    })?;
    if id != s.model.name {
        let mut e = ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no model `{id}`; this server serves `{}`", s.model.name),
        );
        e.field = Some("model".into());
        return Err(e.flavour(Flavour::OpenAi));
    }
    Ok(Json(model_object(&s)))
}

/// A string or a list of strings (OpenAI's `prompt` and `stop`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// OpenAI's `stream_options`.
#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default, deserialize_with = "false_if_null")]
    include_usage: bool,
}

/// OpenAI types its flags "boolean or null", and clients send an unset one as null.
fn false_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    prompt: OneOrMany,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    n: Option<i64>,
    #[serde(default, deserialize_with = "false_if_null")]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    seed: Option<u64>,
    /// Not supported: refused by name rather than dropped (a client asking for them would
    /// read a reply without them as a bug of its own), unless they ask for nothing.
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    frequency_penalty: Option<Value>,
    #[serde(default)]
    presence_penalty: Option<Value>,
    #[serde(default)]
    logit_bias: Option<Value>,
    #[serde(default)]
    suffix: Option<Value>,
    #[serde(default)]
    best_of: Option<Value>,
    #[serde(default)]
    author: Option<String>,
    #[serde(default)]
    lang: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    /// A string, null (an assistant message that called tools) or a list of parts; a
    /// `Value` so that a part the server cannot use is refused naming its place, and so
    /// that a message without `content` is still an error naming it.
    content: Value,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    n: Option<i64>,
    #[serde(default, deserialize_with = "false_if_null")]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    /// Not supported unless they ask for nothing, as `CompletionRequest`'s.
    #[serde(default)]
    frequency_penalty: Option<Value>,
    #[serde(default)]
    presence_penalty: Option<Value>,
    #[serde(default)]
    logit_bias: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    tools: Option<Value>,
    /// With `functions` and `function_call` (their older names), ways to ask for a tool
    /// call: refused unless they ask for none, not dropped into a plain-text answer.
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    author: Option<String>,
    #[serde(default)]
    lang: Option<String>,
}

/// A message's text: a string, nothing (null), or its text parts joined by newlines (as
/// vLLM joins them). Any other part (an image, audio) is refused naming where it is.
fn message_text(content: &Value, at: usize) -> Result<String, ApiError> {
    let field = format!("messages[{at}].content");
    let refuse = |field: String, message: String| {
        Err(ApiError::validation(&field, message).flavour(Flavour::OpenAi))
    };
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (i, part) in parts.iter().enumerate() {
                let field = format!("{field}[{i}]");
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => texts.push(text),
                    (Some("text"), None) => {
                        return refuse(
                            format!("{field}.text"),
                            "a text part needs `text`, a string".into(),
                        )
                    }
                    (Some(other), _) => {
                        return refuse(
                            format!("{field}.type"),
                            format!(
                                "`{other}` parts are not supported: this model reads text only"
                            ),
                        )
                    }
                    (None, _) => {
                        return refuse(format!("{field}.type"), "each part needs a `type`".into())
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        _ => refuse(
            field,
            "expected a string, null, or a list of text parts".into(),
        ),
    }
}

struct OpenAiCall {
    prompt: String,
    params: Parameters,
    names: Names,
    stream: bool,
    include_usage: bool,
    chat: bool,
}

/// The sampling fields OpenAI's two routes share.
struct OpenAiKnobs {
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    n: Option<i64>,
    stop: Option<OneOrMany>,
    seed: Option<u64>,
    author: Option<String>,
    lang: Option<String>,
}

/// `default_tokens`: the new tokens when the request does not say (see [`default_tokens`]).
fn openai_params(k: OpenAiKnobs, default_tokens: usize) -> Result<Parameters, ApiError> {
    if k.n.is_some_and(|n| n != 1) {
        return Err(ApiError::validation("n", "only n = 1 is supported").flavour(Flavour::OpenAi));
    }
    // OpenAI takes top_p in [0, 1]; TGI's range (which `prepare` checks) leaves 0 out.
    // A nucleus of 0 holds the likeliest token alone: greedy decoding.
    let mut temperature = k.temperature.unwrap_or(1.0);
    let mut top_p = k.top_p;
    match k.top_p {
        Some(p) if !(0.0..=1.0).contains(&p) => {
            return Err(
                ApiError::validation("top_p", format!("must be in [0, 1], got {p}"))
                    .flavour(Flavour::OpenAi),
            )
        }
        // 0, or so small it is 0 in f32, where decoding happens.
        Some(p) if (p as f32) <= 0.0 => {
            top_p = None;
            temperature = 0.0;
        }
        _ => {}
    }
    Ok(Parameters {
        max_new_tokens: Some(k.max_tokens.unwrap_or(default_tokens as i64)),
        // OpenAI's default temperature is 1: sampling unless the client asks for 0.
        temperature: Some(temperature),
        top_p,
        seed: k.seed,
        stop: k.stop.map(OneOrMany::into_vec).unwrap_or_default(),
        author: k.author,
        lang: k.lang,
        ..Parameters::default()
    })
}

/// How many new tokens an OpenAI request that does not say gets, within the server's
/// `max_new_tokens` (`limit`): 16 on the completions route, OpenAI's default there; on the
/// chat route the server's limit, since OpenAI's chat has no default of its own but the
/// model's context (16 would cut every chat client's reply short).
fn default_tokens(chat: bool, limit: usize) -> usize {
    if chat {
        limit
    } else {
        16.min(limit)
    }
}

/// Refuses an OpenAI field this server does not implement, naming it.
fn unsupported(field: &str, what: &str) -> ApiError {
    ApiError::validation(field, format!("{what} not supported by this server"))
        .flavour(Flavour::OpenAi)
}

/// Refuses each of these OpenAI fields that asks for something this server does not do:
/// null, or the value that changes nothing (a penalty of 0, no biases, no tools, plain text,
/// no suffix, one candidate), is taken.
fn refuse_unsupported(fields: &[(&str, &Option<Value>)]) -> Result<(), ApiError> {
    for (field, value) in fields {
        let asks_nothing = match (*field, value.as_ref().unwrap_or(&Value::Null)) {
            (_, Value::Null) => true,
            ("frequency_penalty" | "presence_penalty", Value::Number(n)) => n.as_f64() == Some(0.0),
            ("best_of", Value::Number(n)) => n.as_f64() == Some(1.0),
            ("logit_bias", Value::Object(m)) => m.is_empty(),
            ("tools" | "functions", Value::Array(a)) => a.is_empty(),
            ("tool_choice" | "function_call", Value::String(c)) => c == "none" || c == "auto",
            ("suffix", Value::String(t)) => t.is_empty(),
            ("response_format", v) => *v == json!({"type": "text"}),
            _ => false,
        };
        if !asks_nothing {
            return Err(unsupported(
                field,
                &format!("`{field}` = {} is", value.as_ref().unwrap_or(&Value::Null)),
            ));
        }
    }
    Ok(())
}

/// `stream_options` is for a stream only (OpenAI refuses it otherwise too).
fn check_stream_options(stream: bool, o: &Option<StreamOptions>) -> Result<(), ApiError> {
    if o.is_some() && !stream {
        return Err(ApiError::validation(
            "stream_options",
            "`stream_options` is only allowed with `stream: true`",
        )
        .flavour(Flavour::OpenAi));
    }
    Ok(())
}

async fn completions(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r: CompletionRequest = parse(body, Flavour::OpenAi)?;
    let _ = &r.model;
    if r.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(unsupported("logprobs", "logprobs are"));
    }
    if r.echo == Some(true) {
        return Err(unsupported("echo", "echo is"));
    }
    refuse_unsupported(&[
        ("frequency_penalty", &r.frequency_penalty),
        ("presence_penalty", &r.presence_penalty),
        ("logit_bias", &r.logit_bias),
        ("suffix", &r.suffix),
        ("best_of", &r.best_of),
    ])?;
    check_stream_options(r.stream, &r.stream_options)?;
    let prompts = r.prompt.into_vec();
    let refuse = |why: String| Err(ApiError::validation("prompt", why).flavour(Flavour::OpenAi));
    if prompts.is_empty() {
        return refuse("no prompt: give one, or a list of them".into());
    }
    if prompts.len() > MAX_PROMPTS {
        return refuse(format!(
            "{} prompts; at most {MAX_PROMPTS} per request",
            prompts.len()
        ));
    }
    if r.stream && prompts.len() > 1 {
        return refuse("a stream takes one prompt; send a list without `stream`".into());
    }
    let params = openai_params(
        OpenAiKnobs {
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            top_p: r.top_p,
            n: r.n,
            stop: r.stop,
            seed: r.seed,
            author: r.author,
            lang: r.lang,
        },
        default_tokens(false, s.limits.max_new_tokens),
    )?;
    let names = Names {
        prefix: "",
        max_new_tokens: "max_tokens",
        prompt: "prompt",
    };
    if prompts.len() > 1 {
        return completions_for_each(&s, &prompts, &params, names).await;
    }
    openai_call(
        &s,
        OpenAiCall {
            prompt: prompts.into_iter().next().unwrap_or_default(),
            params,
            names,
            stream: r.stream,
            include_usage: r.stream_options.is_some_and(|o| o.include_usage),
            chat: false,
        },
    )
    .await
}

/// Chat for a model that was never tuned to chat: the last user message is the prompt,
/// and the reply is its continuation. Honest, and what existing chat clients can call.
async fn chat(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r: ChatRequest = parse(body, Flavour::OpenAi)?;
    let _ = &r.model;
    if r.logprobs == Some(true) {
        return Err(unsupported("logprobs", "logprobs are"));
    }
    // 0 asks for nothing, as null does.
    if r.top_logprobs
        .as_ref()
        .is_some_and(|v| !v.is_null() && v.as_f64() != Some(0.0))
    {
        return Err(unsupported("top_logprobs", "logprobs are"));
    }
    refuse_unsupported(&[
        ("frequency_penalty", &r.frequency_penalty),
        ("presence_penalty", &r.presence_penalty),
        ("logit_bias", &r.logit_bias),
        ("response_format", &r.response_format),
        ("tools", &r.tools),
        ("functions", &r.functions),
        ("tool_choice", &r.tool_choice),
        ("function_call", &r.function_call),
    ])?;
    check_stream_options(r.stream, &r.stream_options)?;
    // Every message is checked, not only the prompt, so a bad part is refused wherever it is.
    let mut prompt = None;
    for (i, m) in r.messages.iter().enumerate() {
        let text = message_text(&m.content, i)?;
        if m.role == "user" {
            prompt = Some(text);
        }
    }
    let prompt = prompt.ok_or_else(|| {
        ApiError::validation("messages", "no message with role `user`").flavour(Flavour::OpenAi)
    })?;
    let names = Names {
        prefix: "",
        max_new_tokens: match r.max_completion_tokens {
            Some(_) => "max_completion_tokens",
            None => "max_tokens",
        },
        prompt: "messages",
    };
    let params = openai_params(
        OpenAiKnobs {
            max_tokens: r.max_completion_tokens.or(r.max_tokens),
            temperature: r.temperature,
            top_p: r.top_p,
            n: r.n,
            stop: r.stop,
            seed: r.seed,
            author: r.author,
            lang: r.lang,
        },
        default_tokens(true, s.limits.max_new_tokens),
    )?;
    openai_call(
        &s,
        OpenAiCall {
            prompt,
            params,
            names,
            stream: r.stream,
            include_usage: r.stream_options.is_some_and(|o| o.include_usage),
            chat: true,
        },
    )
    .await
}

async fn openai_call(s: &Shared, call: OpenAiCall) -> Result<Response, ApiError> {
    let prep = s
        .prepare(&call.prompt, &call.params, call.names, true)
        .map_err(|e| e.flavour(Flavour::OpenAi))?;
    let rx = s.submit(&prep, Flavour::OpenAi)?;
    let prompt_tokens = prep.row.src.len();
    if !call.stream {
        let c = collect(rx).await.map_err(|e| e.flavour(Flavour::OpenAi))?;
        let choice = if call.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": openai_finish(c.finish), "logprobs": null})
        } else {
            json!({"index": 0, "text": c.text, "finish_reason": openai_finish(c.finish), "logprobs": null})
        };
        let usage = usage(prompt_tokens, c.count);
        return Ok(openai_reply(
            s,
            call.chat,
            vec![choice],
            usage,
            &prep.warnings,
        ));
    }
    let model = s.model.name.clone();
    let head = ChunkHead {
        id: openai_id(call.chat),
        object: match call.chat {
            true => "chat.completion.chunk",
            false => "text_completion",
        },
        created: created(),
        model,
        chat: call.chat,
        include_usage: call.include_usage,
        prompt_tokens,
        warnings: prep.warnings,
    };
    Ok(sse(openai_events(rx, head)))
}

/// Prompts one `/v1/completions` request may list.
pub(crate) const MAX_PROMPTS: usize = 128;

/// Several prompts in one `/v1/completions` request (LangChain's `OpenAI.batch` sends up to
/// 20 at once): each decoded as a request of its own, side by side in the batch, answered as
/// one reply with a choice per prompt in their order and the usage summed, as OpenAI does.
async fn completions_for_each(
    s: &Shared,
    prompts: &[String],
    params: &Parameters,
    names: Names,
) -> Result<Response, ApiError> {
    let mut preps = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        let prep = s.prepare(prompt, params, names, true).map_err(|mut e| {
            if e.field.as_deref() == Some("prompt") {
                e.field = Some(format!("prompt[{i}]"));
            }
            e.flavour(Flavour::OpenAi)
        })?;
        preps.push(prep);
    }
    let mut replies = Vec::with_capacity(preps.len());
    for prep in &preps {
        replies.push(collect(s.submit(prep, Flavour::OpenAi)?));
    }
    let done = futures::future::join_all(replies).await;
    let (mut choices, mut warnings) = (Vec::new(), Vec::<String>::new());
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (i, (prep, c)) in preps.iter().zip(done).enumerate() {
        let c = c.map_err(|e| e.flavour(Flavour::OpenAi))?;
        choices.push(json!({"index": i, "text": c.text, "finish_reason": openai_finish(c.finish), "logprobs": null}));
        prompt_tokens += prep.row.src.len();
        completion_tokens += c.count;
        for w in &prep.warnings {
            if !warnings.contains(w) {
                warnings.push(w.clone());
            }
        }
    }
    let usage = usage(prompt_tokens, completion_tokens);
    Ok(openai_reply(s, false, choices, usage, &warnings))
}

/// A reply's id, with OpenAI's prefixes, which some clients and log tools key on.
fn openai_id(chat: bool) -> String {
    match chat {
        true => format!("chatcmpl-{:016x}", fresh_seed()),
        false => format!("cmpl-{:016x}", fresh_seed()),
    }
}

/// A completion (or chat completion) that is not streamed: its choices, usage and warnings.
fn openai_reply(
    s: &Shared,
    chat: bool,
    choices: Vec<Value>,
    usage: Value,
    warnings: &[String],
) -> Response {
    let mut v = json!({
        "id": openai_id(chat),
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": created(),
        "model": s.model.name.clone(),
        "choices": choices,
        "usage": usage,
    });
    if !warnings.is_empty() {
        v["warnings"] = json!(warnings);
    }
    Json(v).into_response()
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens})
}

/// What every chunk of an OpenAI stream repeats, and how it ends.
struct ChunkHead {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    chat: bool,
    /// `stream_options.include_usage`: every chunk has `usage: null`, and one more chunk
    /// with no choices and the usage comes before `[DONE]`, as OpenAI sends it.
    include_usage: bool,
    prompt_tokens: usize,
    warnings: Vec<String>,
}

impl ChunkHead {
    /// A chat stream's first chunk names the role, with empty content; the others carry
    /// content alone, as OpenAI sends them (openai-python's stream helper joins every string
    /// of the deltas, so a role repeated in each chunk came out `assistantassistant...`).
    fn role_chunk(&self) -> Value {
        let mut v = self.chunk(Some(""), None);
        v["choices"][0]["delta"]["role"] = json!("assistant");
        v
    }

    fn chunk(&self, piece: Option<&str>, finish: Option<&str>) -> Value {
        let choice = if self.chat {
            let delta = match piece {
                Some(p) => json!({"content": p}),
                None => json!({}),
            };
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": piece.unwrap_or(""), "finish_reason": finish, "logprobs": null})
        };
        let mut v = json!({"id": self.id, "object": self.object, "created": self.created,
            "model": self.model, "choices": [choice]});
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }
}

fn openai_events(
    rx: mpsc::UnboundedReceiver<Event>,
    head: ChunkHead,
) -> impl Stream<Item = String> + Send + 'static {
    let data = |v: Value| v.to_string();
    let first: Vec<String> = match head.chat {
        true => vec![data(head.role_chunk())],
        false => Vec::new(),
    };
    let head = Arc::new(head);
    let tokens = stream::unfold(Some(rx), move |rx| {
        let head = head.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                // A special token's text is empty, unless it is the last and carries text
                // held back for the stop sequences (see `engine`).
                Some(Event::Token { text, .. }) => {
                    Some((vec![data(head.chunk(Some(&text), None))], Some(rx)))
                }
                Some(Event::Done { finish, tokens, .. }) => {
                    let mut last = head.chunk(None, Some(openai_finish(finish)));
                    // As the reply without `stream` carries them.
                    if !head.warnings.is_empty() {
                        last["warnings"] = json!(head.warnings);
                    }
                    let mut out = vec![data(last)];
                    if head.include_usage {
                        let mut u = head.chunk(None, None);
                        u["choices"] = json!([]);
                        u["usage"] = usage(head.prompt_tokens, tokens.len());
                        out.push(data(u));
                    }
                    out.push("[DONE]".to_string());
                    Some((out, None))
                }
                // No `[DONE]`: the answer did not finish.
                None => Some((vec![stream_failed(Flavour::OpenAi)], None)),
            }
        }
    });
    stream::iter([first]).chain(tokens).flat_map(stream::iter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{events, options, Server};
    use crate::ServeOptions;

    fn parse_error<T: DeserializeOwned + std::fmt::Debug>(body: &str, f: Flavour) -> ApiError {
        parse::<T>(Ok(Bytes::from(body.to_string())), f).unwrap_err()
    }

    #[test]
    fn a_body_error_names_the_field_at_fault() {
        let e = parse_error::<GenerateRequest>(r#"{"parameters": {}}"#, Flavour::Tgi);
        assert_eq!(
            (e.status, e.field.as_deref()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("inputs"))
        );
        let e = parse_error::<ChatRequest>(r#"{"messages": [{"role": "user"}]}"#, Flavour::OpenAi);
        assert_eq!(e.field.as_deref(), Some("messages[0].content"));
        assert!(e.openai);
        let e = parse_error::<GenerateRequest>(
            r#"{"inputs": "a", "parameters": {"top_k": "x"}}"#,
            Flavour::Tgi,
        );
        assert_eq!(e.field.as_deref(), Some("parameters.top_k"));
        // Not JSON at all: the body, and where it broke.
        let e = parse_error::<GenerateRequest>(r#"{"inputs": "a",, }"#, Flavour::Tgi);
        assert_eq!(
            (e.status, e.field.as_deref()),
            (StatusCode::BAD_REQUEST, Some("body"))
        );
        assert!(e.message.contains("line 1 column 16"), "{}", e.message);
        let e = parse_error::<GenerateRequest>(r#"{"inputs": "a""#, Flavour::Tgi);
        assert_eq!(e.field.as_deref(), Some("body"));
        // Well-formed, but no f64 holds it: the field's value is at fault.
        let e = parse_error::<GenerateRequest>(
            r#"{"inputs": "a", "parameters": {"temperature": 1e400}}"#,
            Flavour::Tgi,
        );
        assert_eq!(
            (e.status, e.field.as_deref()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("parameters.temperature")
            )
        );
        assert!(e.message.contains("out of range"), "{}", e.message);
    }

    #[test]
    fn a_prompt_s_language_is_guessed_from_its_letters() {
        assert_eq!(guess_lang("Аппетит приходит во время еды"), "ru");
        assert_eq!(guess_lang("It is what it is"), "en");
        assert_eq!(guess_lang("12345"), "en");
        assert_eq!(guess_lang("你好世界"), "other");
        assert_eq!(guess_lang("Γειά σου"), "other");
        assert_eq!(guess_lang("Hello 你好世界"), "en");
    }

    #[test]
    fn openai_s_defaults_keep_within_the_server_s_limit() {
        let knobs = || OpenAiKnobs {
            max_tokens: None,
            temperature: None,
            top_p: None,
            n: None,
            stop: None,
            seed: None,
            author: None,
            lang: None,
        };
        let max_new = |chat, limit| {
            openai_params(knobs(), default_tokens(chat, limit))
                .unwrap()
                .max_new_tokens
        };
        assert_eq!(max_new(false, 8), Some(8));
        assert_eq!(max_new(false, 200), Some(16));
        // Chat has no default of its own: the server's limit.
        assert_eq!(max_new(true, 200), Some(200));
        assert_eq!(max_new(true, 8), Some(8));
    }

    /// A list of prompts is answered as OpenAI answers it: a choice per prompt, in order,
    /// each what the prompt alone gets (greedy), and the usage summed.
    #[tokio::test]
    async fn several_prompts_get_a_choice_each_in_order() {
        let s = Server::start(options()).await;
        let ask = |prompt: Value| json!({"prompt": prompt, "max_tokens": 3, "temperature": 0});
        let both = s.ok("/v1/completions", ask(json!(["it is", "Time"]))).await;
        let choices = both["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 2, "{both}");
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        for (i, prompt) in ["it is", "Time"].into_iter().enumerate() {
            let alone = s.ok("/v1/completions", ask(json!(prompt))).await;
            assert_eq!(choices[i]["index"], i, "{both}");
            assert_eq!(choices[i]["text"], alone["choices"][0]["text"], "{prompt}");
            prompt_tokens += alone["usage"]["prompt_tokens"].as_u64().unwrap();
            completion_tokens += alone["usage"]["completion_tokens"].as_u64().unwrap();
        }
        assert_eq!(both["usage"]["prompt_tokens"], prompt_tokens);
        assert_eq!(both["usage"]["completion_tokens"], completion_tokens);
        // A prompt at fault is named by its index.
        let long = "word ".repeat(10_000);
        let (status, body) = s
            .post("/v1/completions", json!({"prompt": ["ok", long]}))
            .await;
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], "prompt[1]", "{body}");
    }

    #[tokio::test]
    async fn openai_routes_name_their_own_fields_and_default_within_the_limit() {
        let s = Server::start(ServeOptions {
            max_new_tokens: Some(4),
            ..options()
        })
        .await;
        let v = s.ok("/v1/completions", json!({"prompt": "it is"})).await;
        assert!(
            v["usage"]["completion_tokens"].as_u64().unwrap() <= 4,
            "{v}"
        );
        let v = s
            .ok(
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "it"}]}),
            )
            .await;
        // It samples (OpenAI's default temperature) from an untrained model, which may say
        // end-of-text early ("stop", about 1 run in 60): only the budget is certain.
        let n = v["usage"]["completion_tokens"].as_u64().unwrap();
        match v["choices"][0]["finish_reason"].as_str() {
            Some("length") => assert_eq!(n, 4, "{v}"),
            Some("stop") => assert!(n <= 4, "{v}"),
            _ => panic!("{v}"),
        }
        for (path, body, param) in [
            (
                "/v1/completions",
                json!({"prompt": "a", "max_tokens": 5}),
                "max_tokens",
            ),
            (
                "/v1/completions",
                json!({"prompt": "a", "max_tokens": 0}),
                "max_tokens",
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 9}),
                "max_tokens",
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 9}),
                "max_completion_tokens",
            ),
            ("/v1/completions", json!({"max_tokens": 1}), "prompt"),
        ] {
            s.refused(path, body, param).await;
        }
        s.stop().await;
    }

    #[tokio::test]
    async fn temperatures_and_penalties_beyond_f32_are_refused_and_tiny_ones_are_greedy() {
        let s = Server::start(options()).await;
        for (param, value) in [
            ("temperature", 1e300),
            ("repetition_penalty", 1e300),
            ("repetition_penalty", 1e-300),
        ] {
            let body = json!({"inputs": "it is", "parameters": {param: value}});
            let (status, text) = s.post("/generate", body).await;
            let v: Value = serde_json::from_str(&text).unwrap();
            let field = format!("parameters.{param}");
            assert_eq!(
                (status, v["field"].as_str()),
                (422, Some(field.as_str())),
                "{text}"
            );
        }
        let (status, text) = s
            .post(
                "/v1/completions",
                json!({"prompt": "a", "temperature": 1e39}),
            )
            .await;
        assert!(
            status == 400 && text.contains(r#""param":"temperature""#),
            "{text}"
        );
        let generate = |temperature: f64| {
            json!({"inputs": "it is", "parameters": {"temperature": temperature,
                "max_new_tokens": 12, "ignore_eos": true, "details": true}})
        };
        let greedy = s.ok("/generate", generate(0.0)).await;
        for t in [1e-45, 1e-300, 1e-5] {
            let v = s.ok("/generate", generate(t)).await;
            assert_eq!(v["generated_text"], greedy["generated_text"], "{t}");
            assert_eq!(v["details"]["tokens"], greedy["details"]["tokens"], "{t}");
            assert!(v["details"]["seed"].is_null(), "greedy: {v}");
        }
        s.stop().await;
    }

    #[tokio::test]
    async fn every_stream_warns_of_an_unknown_author() {
        let s = Server::start(options()).await;
        let warned = |v: &Value| {
            v["warnings"][0]
                .as_str()
                .is_some_and(|w| w.contains("author `nobody`"))
        };
        for details in [false, true] {
            let (status, text) = s
                .post(
                    "/generate_stream",
                    json!({"inputs": "it", "parameters": {"author": "nobody", "details": details,
                        "max_new_tokens": 3}}),
                )
                .await;
            let evs = events(&text);
            assert!(status == 200 && warned(evs.last().unwrap()), "{text}");
        }
        for (path, body) in [
            ("/v1/completions", json!({"prompt": "it"})),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "it"}]}),
            ),
        ] {
            let mut body = body;
            body["author"] = json!("nobody");
            body["max_tokens"] = json!(3);
            body["stream"] = json!(true);
            let (status, text) = s.post(path, body.clone()).await;
            let evs = events(&text);
            assert!(
                status == 200 && warned(evs.last().unwrap()),
                "{path}: {text}"
            );
            body["stream"] = json!(false);
            assert!(warned(&s.ok(path, body.clone()).await), "{path}");
            // A known author, in another spelling of its name: no warnings at all.
            body["author"] = json!("T wain");
            body["stream"] = json!(true);
            let (status, text) = s.post(path, body).await;
            assert_eq!(status, 200, "{text}");
            let evs = events(&text);
            assert!(
                !evs.is_empty() && evs.iter().all(|e| e.get("warnings").is_none()),
                "{text}"
            );
        }
        s.stop().await;
    }

    #[tokio::test]
    async fn prefill_shows_text_and_a_prompt_cannot_name_control_tokens() {
        let s = Server::start(options()).await;
        let v = s
            .ok(
                "/generate",
                json!({"inputs": " is<eos>", "parameters": {"details": true, "max_new_tokens": 1,
                    "author": "twain"}}),
            )
            .await;
        let texts: Vec<&str> = v["details"]["prefill"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            texts,
            [
                "<lang:en>",
                "<author:twain>",
                " is",
                "<",
                "e",
                "o",
                "s",
                ">"
            ]
        );
        let (_, text) = s.post("/tokenize", json!({"inputs": "<eos>"})).await;
        let toks: Vec<Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(toks.len(), 5, "{text}");
        // A decomposed `é` is tokenized as /generate reads it, composed.
        let (_, decomposed) = s.post("/tokenize", json!({"inputs": "cafe\u{301}"})).await;
        let (_, composed) = s.post("/tokenize", json!({"inputs": "caf\u{e9}"})).await;
        assert_eq!(decomposed, composed);
        s.stop().await;
    }

    fn token(index: usize, text: &str, last: bool) -> Event {
        Event::Token {
            token: orchestrate_model::generate::Token {
                id: 100 + index as u32,
                logprob: -1.0,
                index,
            },
            text: text.into(),
            piece: text.into(),
            special_id: false,
            last,
        }
    }

    fn done(text: &str, n: u32) -> Event {
        Event::Done {
            finish: Finish::Length,
            tokens: (0..n).collect(),
            text: text.into(),
        }
    }

    fn tail() -> TgiTail {
        TgiTail {
            details: true,
            seed: None,
            input_length: 3,
            warnings: Vec::new(),
            prefix: String::new(),
        }
    }

    /// The next item of a stream, or None if it has none ready within 100 ms.
    async fn ready<S: Stream<Item = String> + Unpin>(events: &mut S) -> Option<String> {
        tokio::time::timeout(std::time::Duration::from_millis(100), events.next())
            .await
            .ok()
            .flatten()
    }

    #[tokio::test]
    async fn a_tgi_stream_sends_each_token_as_it_comes_and_the_summary_with_the_last() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut events = Box::pin(tgi_events(rx, tail()));
        tx.send(token(0, "a", false)).unwrap();
        // Sent before the engine has decoded the next token (it used to wait for it).
        let first: Value = serde_json::from_str(&ready(&mut events).await.unwrap()).unwrap();
        assert_eq!(
            (first["token"]["text"].as_str(), first["index"].as_u64()),
            (Some("a"), Some(1))
        );
        assert!(first["generated_text"].is_null());
        tx.send(token(1, "b", true)).unwrap();
        // The last token waits for its summary alone.
        assert_eq!(ready(&mut events).await, None);
        tx.send(done("ab", 2)).unwrap();
        let last: Value = serde_json::from_str(&ready(&mut events).await.unwrap()).unwrap();
        assert_eq!(last["token"]["text"], "b");
        assert_eq!(last["generated_text"], "ab");
        assert_eq!(last["details"]["generated_tokens"], 2);
        assert_eq!(last["details"]["finish_reason"], "length");
        assert_eq!(events.next().await, None);
    }

    #[tokio::test]
    async fn a_stream_the_decoder_cut_short_ends_with_an_error_event() {
        // TGI: the tokens sent, then an error event in TGI's shape.
        for last in [false, true] {
            let (tx, rx) = mpsc::unbounded_channel();
            tx.send(token(0, "a", last)).unwrap();
            drop(tx); // the decoder failed: the channel closes without `Done`
            let got: Vec<Value> = tgi_events(rx, tail())
                .map(|e| serde_json::from_str(&e).unwrap())
                .collect()
                .await;
            assert_eq!(got.len(), 2, "{got:?}");
            assert_eq!(got[0]["token"]["text"], "a");
            assert_eq!(got[1]["error_type"], "unavailable", "{got:?}");
            assert!(got[1]["error"].is_string());
        }
        // OpenAI: an error chunk in OpenAI's shape, and no [DONE].
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(token(0, "a", false)).unwrap();
        drop(tx);
        let head = ChunkHead {
            id: "cmpl-1".into(),
            object: "text_completion",
            created: 0,
            model: "m".into(),
            chat: false,
            include_usage: false,
            prompt_tokens: 3,
            warnings: Vec::new(),
        };
        let got: Vec<String> = openai_events(rx, head).collect().await;
        assert_eq!(got.len(), 2, "{got:?}");
        let err: Value = serde_json::from_str(&got[1]).unwrap();
        assert_eq!(err["error"]["type"], "unavailable", "{got:?}");
        assert!(!got.iter().any(|e| e == "[DONE]"));
    }

    #[tokio::test]
    async fn a_stream_that_ends_failed_is_counted_503_and_nginx_does_not_buffer_streams() {
        for (events, status) in [
            (vec!["{}".to_string(), "[DONE]".into()], 200),
            (vec!["{}".to_string(), stream_failed(Flavour::Tgi)], 503),
            (vec![stream_failed(Flavour::OpenAi)], 503),
        ] {
            let r = sse(stream::iter(events));
            assert_eq!(r.headers()["x-accel-buffering"], "no");
            let StreamStatus(seen) = r.extensions().get::<StreamStatus>().unwrap().clone();
            // The head says 200; the status `observe` counts is the one at the end.
            assert_eq!(seen.load(Ordering::SeqCst), 200);
            axum::body::to_bytes(r.into_body(), usize::MAX)
                .await
                .unwrap();
            assert_eq!(seen.load(Ordering::SeqCst), status);
        }
    }

    #[tokio::test]
    async fn chat_content_may_be_text_parts_or_null_and_other_parts_are_named() {
        let s = Server::start(options()).await;
        let greedy = |content: Value| {
            json!({"messages": [{"role": "assistant", "content": null},
                {"role": "user", "content": content}], "max_tokens": 4, "temperature": 0})
        };
        let plain = s.ok("/v1/chat/completions", greedy(json!("it\nis"))).await;
        let parts = s
            .ok(
                "/v1/chat/completions",
                greedy(json!([{"type": "text", "text": "it"}, {"type": "text", "text": "is"}])),
            )
            .await;
        assert_eq!(
            parts["choices"][0]["message"]["content"], plain["choices"][0]["message"]["content"],
            "text parts join with newlines"
        );
        assert!(
            parts["id"].as_str().unwrap().starts_with("chatcmpl-"),
            "{parts}"
        );
        for (content, param) in [
            (
                json!([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]),
                "messages[1].content[1].type",
            ),
            (json!([{"type": "text"}]), "messages[1].content[0].text"),
            (json!(5), "messages[1].content"),
        ] {
            s.refused("/v1/chat/completions", greedy(content), param)
                .await;
        }
        s.stop().await;
    }

    #[tokio::test]
    async fn openai_top_p_0_is_greedy_usage_streams_and_unsupported_fields_are_named() {
        let s = Server::start(options()).await;
        let body = |extra: Value| {
            let mut b = json!({"prompt": "it is", "max_tokens": 8});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            b
        };
        let greedy = s
            .ok("/v1/completions", body(json!({"temperature": 0})))
            .await;
        for seed in [1, 2] {
            let v = s
                .ok("/v1/completions", body(json!({"top_p": 0, "seed": seed})))
                .await;
            assert_eq!(v["choices"][0]["text"], greedy["choices"][0]["text"], "{v}");
        }
        let v = s
            .ok(
                "/v1/completions",
                body(json!({"temperature": 0, "top_p": 0})),
            )
            .await;
        assert_eq!(v["choices"][0]["text"], greedy["choices"][0]["text"]);
        for (path, extra, param) in [
            ("/v1/completions", json!({"top_p": 1.5}), "top_p"),
            ("/v1/completions", json!({"top_p": -0.1}), "top_p"),
            ("/v1/completions", json!({"logprobs": 2}), "logprobs"),
            ("/v1/completions", json!({"echo": true}), "echo"),
            (
                "/v1/chat/completions",
                json!({"logprobs": true}),
                "logprobs",
            ),
            (
                "/v1/chat/completions",
                json!({"top_logprobs": 2}),
                "top_logprobs",
            ),
            (
                "/v1/completions",
                json!({"frequency_penalty": 0.5}),
                "frequency_penalty",
            ),
            (
                "/v1/completions",
                json!({"presence_penalty": -1}),
                "presence_penalty",
            ),
            (
                "/v1/completions",
                json!({"logit_bias": {"50256": -100}}),
                "logit_bias",
            ),
            ("/v1/completions", json!({"suffix": "end"}), "suffix"),
            ("/v1/completions", json!({"best_of": 3}), "best_of"),
            (
                "/v1/completions",
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (
                "/v1/chat/completions",
                json!({"presence_penalty": 0.1}),
                "presence_penalty",
            ),
            (
                "/v1/chat/completions",
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                "/v1/chat/completions",
                json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
                "tools",
            ),
            (
                "/v1/chat/completions",
                json!({"functions": [{"name": "f", "parameters": {}}]}),
                "functions",
            ),
            (
                "/v1/chat/completions",
                json!({"tool_choice": "required"}),
                "tool_choice",
            ),
            (
                "/v1/chat/completions",
                json!({"function_call": {"name": "f"}}),
                "function_call",
            ),
            (
                "/v1/chat/completions",
                json!({"stream": false, "stream_options": {}}),
                "stream_options",
            ),
        ] {
            let mut b = body(extra);
            if path.contains("chat") {
                b["messages"] = json!([{"role": "user", "content": "it"}]);
            }
            s.refused(path, b, param).await;
        }
        // Asked-for defaults that change nothing are taken, and `user` (an id).
        s.ok(
            "/v1/completions",
            body(
                json!({"logprobs": null, "echo": false, "frequency_penalty": 0,
                "presence_penalty": 0.0, "logit_bias": {}, "suffix": null, "best_of": 1,
                "user": "u-1"}),
            ),
        )
        .await;
        s.ok(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "it"}], "max_tokens": 8,
                "frequency_penalty": 0, "logit_bias": null, "tools": [], "tool_choice": "none",
                "functions": [], "function_call": "auto",
                "response_format": {"type": "text"}, "user": "u-1"}),
        )
        .await;
        // A nucleus that is 0 in f32 is greedy too, on both APIs.
        let v = s
            .ok("/v1/completions", body(json!({"top_p": 1e-50, "seed": 3})))
            .await;
        assert_eq!(v["choices"][0]["text"], greedy["choices"][0]["text"], "{v}");
        let tgi_greedy = s
            .ok(
                "/generate",
                json!({"inputs": "it is", "parameters": {"max_new_tokens": 8}}),
            )
            .await;
        for seed in [1, 2] {
            let v = s
                .ok(
                    "/generate",
                    json!({"inputs": "it is", "parameters": {"max_new_tokens": 8,
                        "top_p": 1e-50, "seed": seed, "details": true}}),
                )
                .await;
            assert_eq!(v["generated_text"], tgi_greedy["generated_text"], "{v}");
            // Greedy: no seed was used.
            assert!(
                v["details"].is_object() && v["details"]["seed"].is_null(),
                "{v}"
            );
        }
        for (path, mut b) in [
            ("/v1/completions", body(json!({}))),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "it"}], "max_tokens": 8}),
            ),
        ] {
            b["stream"] = json!(true);
            b["stream_options"] = json!({"include_usage": true});
            let (status, text) = s.post(path, b).await;
            assert_eq!(status, 200, "{text}");
            assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
            let evs = events(&text);
            let usage = evs.last().unwrap();
            assert_eq!(usage["choices"], json!([]), "{text}");
            let n = usage["usage"]["completion_tokens"].as_u64().unwrap();
            assert!(n >= 1, "{text}");
            assert_eq!(
                usage["usage"]["total_tokens"].as_u64(),
                Some(n + usage["usage"]["prompt_tokens"].as_u64().unwrap())
            );
            // Every other chunk says `usage: null`, as OpenAI's do.
            assert!(evs[..evs.len() - 1]
                .iter()
                .all(|e| e["usage"].is_null() && e.get("usage").is_some()));
        }
        s.stop().await;
    }

    #[tokio::test]
    async fn tgi_truncate_return_full_text_and_greedy_at_temperature_1() {
        let s = Server::start(options()).await;
        let v = s
            .ok(
                "/generate",
                json!({"inputs": "abcdef", "parameters": {"truncate": 3, "details": true,
                    "max_new_tokens": 2, "return_full_text": true}}),
            )
            .await;
        let prefill: Vec<&str> = v["details"]["prefill"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["text"].as_str().unwrap())
            .collect();
        // The control tokens, then the last 3 of the prompt's.
        assert_eq!(prefill[2..], ["d", "e", "f"], "{v}");
        assert!(
            v["generated_text"].as_str().unwrap().starts_with("abcdef"),
            "{v}"
        );
        let (status, text) = s
            .post(
                "/generate",
                json!({"inputs": "a", "parameters": {"truncate": 0}}),
            )
            .await;
        assert!(
            status == 422 && text.contains("parameters.truncate"),
            "{text}"
        );
        // `truncate` at /info's `max_input_tokens` is accepted whatever the prompt's length,
        // the control tokens within it; above it, it is refused as TGI refuses it.
        let info = s.get_json("/info").await;
        let most = info["max_input_tokens"].as_u64().unwrap();
        let long = "abc ".repeat(most as usize);
        let v = s
            .ok(
                "/generate",
                json!({"inputs": long, "parameters": {"truncate": most, "details": true, "max_new_tokens": 1}}),
            )
            .await;
        assert_eq!(
            v["details"]["prefill"].as_array().unwrap().len() as u64,
            most,
            "{v}"
        );
        let (status, text) = s
            .post(
                "/generate",
                json!({"inputs": "a", "parameters": {"truncate": most + 1}}),
            )
            .await;
        assert!(
            status == 422 && text.contains("must be at most max_input_tokens"),
            "{text}"
        );
        // The stream's last event has the full text too.
        let (_, text) = s
            .post(
                "/generate_stream",
                json!({"inputs": "it", "parameters": {"max_new_tokens": 3, "return_full_text": true}}),
            )
            .await;
        let evs = events(&text);
        let streamed: String = evs
            .iter()
            .map(|e| e["token"]["text"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            evs.last().unwrap()["generated_text"].as_str().unwrap(),
            format!("it{streamed}")
        );
        // TGI samples only when asked or when a warper changes the distribution: a
        // temperature of 1 changes nothing, so without do_sample it is greedy.
        let gen = |params: Value| json!({"inputs": "it is", "parameters": params});
        let greedy = s
            .ok(
                "/generate",
                gen(json!({"max_new_tokens": 12, "ignore_eos": true, "details": true})),
            )
            .await;
        for seed in [1, 2, 3] {
            let v = s
                .ok(
                    "/generate",
                    gen(
                        json!({"max_new_tokens": 12, "ignore_eos": true, "details": true,
                        "temperature": 1.0, "seed": seed}),
                    ),
                )
                .await;
            assert_eq!(v["generated_text"], greedy["generated_text"]);
            assert!(v["details"]["seed"].is_null(), "greedy: {v}");
        }
        // Any other temperature is a warper: it samples (and says its seed), as TGI does.
        let v = s
            .ok(
                "/generate",
                gen(json!({"max_new_tokens": 2, "details": true, "temperature": 0.7, "seed": 5})),
            )
            .await;
        assert_eq!(v["details"]["seed"], 5, "{v}");
        s.stop().await;
    }

    #[tokio::test]
    async fn wrong_methods_and_unknown_v1_routes_answer_json_in_their_family_s_shape() {
        let s = Server::start(options()).await;
        let http = reqwest::Client::new();
        let get = |path: &str| http.get(format!("{}{path}", s.base)).send();
        let r = get("/generate").await.unwrap();
        assert_eq!(r.status(), 405);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error_type"], "method_not_allowed", "{v}");
        let r = get("/v1/completions").await.unwrap();
        assert_eq!(r.status(), 405);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "method_not_allowed", "{v}");
        let r = get("/v1/nothing").await.unwrap();
        assert_eq!(r.status(), 404);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "OpenAI's shape: {v}");
        let r = get("/nothing").await.unwrap();
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"].is_string() && v["error_type"] == "not_found",
            "{v}"
        );
        s.stop().await;
    }

    #[tokio::test]
    async fn the_key_s_scheme_is_case_insensitive_401_says_bearer_and_docs_stay_open() {
        let s = Server::start(ServeOptions {
            api_key: Some("k3y".into()),
            ..options()
        })
        .await;
        let http = reqwest::Client::new();
        let body = json!({"inputs": "a", "parameters": {"max_new_tokens": 1}});
        for auth in ["Bearer k3y", "bearer k3y", "BEARER k3y"] {
            let r = http
                .post(format!("{}/generate", s.base))
                .header("authorization", auth)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{auth}");
        }
        let r = http
            .post(format!("{}/generate", s.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        for path in ["/docs", "/openapi.json", "/health", "/metrics"] {
            let r = http.get(format!("{}{path}", s.base)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
        }
        let r = http.get(format!("{}/info", s.base)).send().await.unwrap();
        assert_eq!(r.status(), 401, "/info keeps its key");
        s.stop().await;
    }

    #[test]
    fn the_openapi_document_says_what_the_server_does() {
        let doc = crate::docs::openapi();
        let paths = &doc["paths"];
        let params = &paths["/generate"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"]["properties"]["parameters"]["properties"];
        assert!(params["lang"]["enum"]
            .as_array()
            .unwrap()
            .contains(&json!("other")));
        assert!(params["truncate"].is_object() && params["return_full_text"].is_object());
        let chat = &paths["/v1/chat/completions"]["post"]["requestBody"]["content"]
            ["application/json"]["schema"]["properties"];
        for field in [
            "max_completion_tokens",
            "top_p",
            "stop",
            "seed",
            "n",
            "author",
            "lang",
            "stream_options",
        ] {
            assert!(chat[field].is_object(), "chat lacks {field}");
        }
        let completion = &paths["/v1/completions"]["post"]["requestBody"]["content"]
            ["application/json"]["schema"]["properties"];
        assert!(completion["prompt"]["oneOf"][1]["maxItems"] == MAX_PROMPTS);
        for path in [
            "/",
            "/v1/completions",
            "/v1/chat/completions",
            "/generate_stream",
        ] {
            let ok = &paths[path]["post"]["responses"]["200"]["content"];
            assert!(ok["text/event-stream"].is_object(), "{path} streams");
        }
        for path in ["/generate", "/v1/completions"] {
            let r = &paths[path]["post"]["responses"];
            for code in ["400", "405", "408", "429", "503"] {
                assert!(r[code].is_object(), "{path} lacks {code}");
            }
        }
        let tokenize = &paths["/tokenize"]["post"]["responses"];
        assert!(tokenize["429"].is_null() && tokenize["503"].is_null());
        // `stream` is read on `/` alone; a model by another name is a 404.
        let schema = |path: &str| {
            paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
                ["properties"]
                .clone()
        };
        assert!(schema("/")["stream"].is_object());
        assert!(schema("/generate")["stream"].is_null());
        assert!(schema("/generate_stream")["stream"].is_null());
        assert!(paths["/v1/models/{id}"]["get"]["responses"]["404"].is_object());
    }

    #[tokio::test]
    async fn a_stream_s_tokens_add_up_to_its_generated_text() {
        let s = Server::start(options()).await;
        let params = json!({"max_new_tokens": 40, "ignore_eos": true, "details": true});
        let free = s
            .ok(
                "/generate",
                json!({"inputs": "it is", "parameters": params}),
            )
            .await;
        let text = free["generated_text"].as_str().unwrap().to_string();
        let chars: Vec<char> = text.chars().collect();
        assert!(chars.len() >= 6, "the test needs some text: {free}");
        // A stop sequence from the middle of what the model says without one.
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
        let cut = &text[..text.find(&stop).unwrap()];
        for stops in [vec![], vec![stop.clone()]] {
            let mut params = params.clone();
            params["stop"] = json!(stops);
            let body = json!({"inputs": "it is", "parameters": params});
            let (status, body) = s.post("/generate_stream", body).await;
            assert_eq!(status, 200);
            let evs = events(&body);
            let streamed: String = evs
                .iter()
                .filter(|e| !e["token"]["special"].as_bool().unwrap())
                .map(|e| e["token"]["text"].as_str().unwrap())
                .collect();
            let last = evs.last().unwrap();
            let generated = last["generated_text"].as_str().unwrap();
            assert_eq!(streamed, generated, "{body}");
            let want = if stops.is_empty() { text.as_str() } else { cut };
            assert_eq!(generated, want, "stop {stop:?}");
            // The same request answered whole says the same.
            let body = json!({"inputs": "it is", "parameters": params});
            assert_eq!(s.ok("/generate", body).await["generated_text"], want);
        }
        s.stop().await;
    }

    /// A chat stream as OpenAI sends one: the role in the first chunk only (with empty
    /// content), content alone after it, a finish chunk with an empty delta. Merged as
    /// openai-python's stream helper merges deltas (every string joined), the message is
    /// the assistant's with the reply the same request gets whole.
    #[tokio::test]
    async fn a_chat_stream_names_the_role_once() {
        let s = Server::start(options()).await;
        let body = |stream: bool| {
            json!({"messages": [{"role": "user", "content": "it is"}], "max_tokens": 12,
                "temperature": 0, "stream": stream})
        };
        let (status, text) = s.post("/v1/chat/completions", body(true)).await;
        assert_eq!(status, 200, "{text}");
        let chunks = events(&text);
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let mut merged = serde_json::Map::new();
        for c in &chunks {
            for (k, v) in c["choices"][0]["delta"].as_object().unwrap() {
                let joined = merged
                    .get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
                    + v.as_str().unwrap();
                merged.insert(k.clone(), json!(joined));
            }
        }
        assert!(chunks[1..]
            .iter()
            .all(|c| c["choices"][0]["delta"].get("role").is_none()));
        let whole = s.ok("/v1/chat/completions", body(false)).await;
        assert_eq!(Value::Object(merged), whole["choices"][0]["message"]);
        s.stop().await;
    }
}
