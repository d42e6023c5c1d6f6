//! The HTTP API: Text Generation Inference's routes and OpenAI's completion routes over one
//! engine, so clients of either work unchanged. Errors are JSON and name the field at fault:
//! TGI's shape (`{"error", "error_type"}`) on TGI routes, OpenAI's (`{"error": {"message",
//! "type", "param"}}`) under `/v1`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = if self.openai {
            json!({"error": {"message": self.message, "type": self.kind, "param": self.field, "code": null}})
        } else {
            json!({"error": self.message, "error_type": self.kind, "field": self.field})
        };
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
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
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(not_found)
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
                .allow_headers([
                    header::CONTENT_TYPE,
                    header::AUTHORIZATION,
                    header::HeaderName::from_static("x-api-key"),
                ]),
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

/// Per-route request counts and latencies (to the response head; a stream's body follows).
async fn observe(State(s): State<Shared>, req: Request, next: MwNext) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .request(&route, resp.status().as_u16(), started.elapsed());
    resp
}

/// `Authorization: Bearer KEY` or `X-API-Key: KEY` when a key is set; /health and /metrics
/// stay open for probes and scrapers.
async fn authorize(State(s): State<Shared>, req: Request, next: MwNext) -> Response {
    let Some(want) = s.api_key else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path == "/health" || path == "/metrics" {
        return next.run(req).await;
    }
    let h = req.headers();
    let given = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()));
    let ok = given.is_some_and(|k| constant_time_eq(blake3::hash(k.as_bytes()).as_bytes(), &want));
    if ok {
        return next.run(req).await;
    }
    let openai = path.starts_with("/v1/");
    let mut e = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong API key (Authorization: Bearer KEY, or X-API-Key)",
    );
    e.openai = openai;
    e.into_response()
}

/// Equal-length comparison whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /docs",
    )
}

/// Parses a JSON body, naming the field at fault.
fn parse<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    f: Flavour,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        let e = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large("body", "request body too large")
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
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let err = if inner.is_syntax() || inner.is_eof() {
            // The message says where: "... at line 1 column 12".
            let mut err = ApiError::new(
                StatusCode::BAD_REQUEST,
                "validation",
                format!("body is not valid JSON: {inner}"),
            );
            err.field = Some("body".into());
            err
        } else {
            ApiError::validation(&error_field(&path, &inner), inner.to_string())
        };
        err.flavour(f)
    })
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
}

#[derive(Debug, Deserialize)]
pub struct GenerateRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: Parameters,
    #[serde(default)]
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

fn fresh_seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    orchestrate_model::data::mix(t as u64)
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
        if let Some(tp) = p.top_p {
            if !(tp > 0.0 && tp <= 1.0) {
                return Err(ApiError::validation(
                    &field("top_p"),
                    format!("must be in (0, 1], got {tp}"),
                ));
            }
        }
        if let Some(r) = p.repetition_penalty {
            // Scores are divided by it: it must not be 0 (or a subnormal) in f32 either.
            if !r.is_finite() || !(r as f32).is_normal() || r <= 0.0 {
                return Err(ApiError::validation(
                    &field("repetition_penalty"),
                    format!(
                        "must be a number from {:e} to {:e}, got {r}",
                        f32::MIN_POSITIVE,
                        f32::MAX
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
            None => guess_lang(prompt).to_string(),
        };
        let (prompt_ids, known) = orchestrate_model::artifact::prompt_ids(
            &m.tokenizer,
            &m.card.specials,
            prompt,
            &lang,
            p.author.as_deref(),
        )
        .map_err(|e| ApiError::validation(names.prompt, format!("cannot tokenize: {e}")))?;
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
        let cold = p.temperature.is_some_and(|t| (t as f32) < MIN_TEMPERATURE);
        let sample = !cold
            && (p.do_sample
                || p.top_k.is_some()
                || p.top_p.is_some_and(|t| t < 1.0)
                || p.temperature.map_or(sampling_default, |t| t > 0.0));
        let seed = sample.then(|| p.seed.unwrap_or_else(fresh_seed));
        let sampling = if sample {
            Sampling {
                temperature: p.temperature.filter(|t| *t > 0.0).unwrap_or(1.0) as f32,
                top_k: p.top_k.map(|k| k as usize),
                top_p: p.top_p.map(|t| t as f32),
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
            stop: p.stop.clone(),
            warnings,
            seed,
        })
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
                Refused::Busy => ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "overloaded",
                    format!(
                        "the queue is full ({} waiting); retry shortly",
                        self.limits.queue
                    ),
                ),
                Refused::Stopped => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the server is shutting down",
                ),
            }
            .flavour(f)
        })
    }
}

/// Cyrillic letters mean Russian; anything else is taken as English. The caller can say.
fn guess_lang(text: &str) -> &'static str {
    let cyr = text
        .chars()
        .filter(|c| matches!(c, 'а'..='я' | 'А'..='Я' | 'ё' | 'Ё'))
        .count();
    let latin = text.chars().filter(|c| c.is_ascii_alphabetic()).count();
    if cyr > latin {
        "ru"
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
                text,
                special,
            } => {
                tokens.push(json!({"id": token.id, "text": text, "logprob": token.logprob, "special": special}));
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
    let mut v = json!({"generated_text": c.text});
    if req.parameters.details {
        v["details"] = s.details(&prep.row.src, &prep.warnings, prep.seed, &c);
    }
    if !prep.warnings.is_empty() {
        v["warnings"] = json!(prep.warnings);
    }
    Ok(v)
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

fn sse(events: impl Stream<Item = SseEvent> + Send + 'static) -> Response {
    Sse::new(events.map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// One event per token; the last also carries `generated_text`, `details` (when asked)
/// and `warnings` (when there are any), as `/generate`'s reply does.
fn stream_tgi(s: &Shared, req: GenerateRequest) -> Result<Response, ApiError> {
    let prep = s.prepare(&req.inputs, &req.parameters, TGI_NAMES, false)?;
    let rx = s.submit(&prep, Flavour::Tgi)?;
    let state = s.clone();
    let want_details = req.parameters.details;
    let events = stream::unfold(
        (rx, Vec::new(), None::<Value>, false),
        move |(mut rx, mut toks, pending, done)| {
            let state = state.clone();
            let prep_seed = prep.seed;
            let prompt_ids = prep.row.src.clone();
            let warnings = prep.warnings.clone();
            async move {
                if done {
                    return None;
                }
                // Each token is held back one event, so the last one can carry the summary.
                match rx.recv().await? {
                    Event::Token {
                        token,
                        text,
                        special,
                    } => {
                        let t = json!({"id": token.id, "text": text, "logprob": token.logprob, "special": special});
                        toks.push(t.clone());
                        let next = json!({"index": token.index + 1, "token": t, "generated_text": null, "details": null});
                        let ev = match pending {
                            Some(p) => SseEvent::default().data(p.to_string()),
                            None => SseEvent::default().comment("start"),
                        };
                        Some((ev, (rx, toks, Some(next), false)))
                    }
                    Event::Done {
                        finish,
                        tokens,
                        text,
                    } => {
                        let mut last = pending.unwrap_or_else(|| json!({"index": 0, "token": null, "generated_text": null, "details": null}));
                        last["generated_text"] = json!(text);
                        if !warnings.is_empty() {
                            last["warnings"] = json!(warnings);
                        }
                        if want_details {
                            let c = Collected {
                                text,
                                finish,
                                tokens: Vec::new(),
                                count: tokens.len(),
                            };
                            let mut d = state.details(&prompt_ids, &warnings, prep_seed, &c);
                            if let Some(o) = d.as_object_mut() {
                                o.remove("tokens");
                                o.remove("prefill");
                            }
                            last["details"] = d;
                        }
                        Some((
                            SseEvent::default().data(last.to_string()),
                            (rx, toks, None, true),
                        ))
                    }
                }
            }
        },
    );
    Ok(sse(events))
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
    let enc = s
        .model
        .tokenizer
        .encode(req.inputs.as_str(), false)
        .map_err(|e| ApiError::validation("inputs", format!("cannot tokenize: {e}")))?;
    let out: Vec<Value> = enc
        .get_ids()
        .iter()
        .zip(enc.get_offsets())
        .map(|(id, (a, b))| json!({"id": id, "text": req.inputs.get(*a..*b).unwrap_or(""), "start": a, "stop": b}))
        .collect();
    Ok(Json(json!(out)))
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
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
        "max_concurrent_requests": l.queue,
        "max_best_of": 1,
        "max_stop_sequences": l.max_stop_sequences,
        "max_input_tokens": l.max_input_tokens,
        "max_total_tokens": l.max_input_tokens + l.max_new_tokens,
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
    Json(
        json!({"object": "list", "data": [{"id": s.model.name, "object": "model", "created": s.model.created, "owned_by": "orchestrate"}]}),
    )
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
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    author: Option<String>,
    #[serde(default)]
    lang: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: String,
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
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    author: Option<String>,
    #[serde(default)]
    lang: Option<String>,
}

struct OpenAiCall {
    prompt: String,
    params: Parameters,
    names: Names,
    stream: bool,
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

/// `limit`: the server's `max_new_tokens`, which OpenAI's default of 16 must not pass.
fn openai_params(k: OpenAiKnobs, limit: usize) -> Result<Parameters, ApiError> {
    if k.n.is_some_and(|n| n != 1) {
        return Err(ApiError::validation("n", "only n = 1 is supported").flavour(Flavour::OpenAi));
    }
    Ok(Parameters {
        max_new_tokens: Some(k.max_tokens.unwrap_or(16.min(limit as i64))),
        // OpenAI's default temperature is 1: sampling unless the client asks for 0.
        temperature: Some(k.temperature.unwrap_or(1.0)),
        top_p: k.top_p,
        seed: k.seed,
        stop: k.stop.map(OneOrMany::into_vec).unwrap_or_default(),
        author: k.author,
        lang: k.lang,
        ..Parameters::default()
    })
}

async fn completions(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r: CompletionRequest = parse(body, Flavour::OpenAi)?;
    let _ = (&r.model, r.frequency_penalty);
    let prompts = r.prompt.into_vec();
    if prompts.len() != 1 {
        return Err(
            ApiError::validation("prompt", "exactly one prompt per request")
                .flavour(Flavour::OpenAi),
        );
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
        s.limits.max_new_tokens,
    )?;
    openai_call(
        &s,
        OpenAiCall {
            prompt: prompts.into_iter().next().unwrap_or_default(),
            params,
            names: Names {
                prefix: "",
                max_new_tokens: "max_tokens",
                prompt: "prompt",
            },
            stream: r.stream,
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
    let prompt = r
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.content.clone())
        .ok_or_else(|| {
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
        s.limits.max_new_tokens,
    )?;
    openai_call(
        &s,
        OpenAiCall {
            prompt,
            params,
            names,
            stream: r.stream,
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
    let id = format!("cmpl-{:016x}", fresh_seed());
    let model = s.model.name.clone();
    let created = created();
    let prompt_tokens = prep.row.src.len();
    if !call.stream {
        let c = collect(rx).await?;
        let choice = if call.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": openai_finish(c.finish), "logprobs": null})
        } else {
            json!({"index": 0, "text": c.text, "finish_reason": openai_finish(c.finish), "logprobs": null})
        };
        let mut v = json!({
            "id": id,
            "object": if call.chat { "chat.completion" } else { "text_completion" },
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": c.count, "total_tokens": prompt_tokens + c.count},
        });
        if !prep.warnings.is_empty() {
            v["warnings"] = json!(prep.warnings);
        }
        return Ok(Json(v).into_response());
    }
    let object = if call.chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chat = call.chat;
    let warnings = prep.warnings;
    let chunk = move |piece: Option<&str>, finish: Option<&str>| {
        let choice = if chat {
            let delta = match piece {
                Some(p) => json!({"role": "assistant", "content": p}),
                None => json!({}),
            };
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": piece.unwrap_or(""), "finish_reason": finish, "logprobs": null})
        };
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    // Phases: 0 streaming tokens, 1 the closing chunk was sent (OpenAI's `[DONE]` next), 2 over.
    let events = stream::unfold((rx, 0u8), move |(mut rx, phase)| {
        let chunk = chunk.clone();
        let warnings = warnings.clone();
        async move {
            match phase {
                1 => return Some((SseEvent::default().data("[DONE]"), (rx, 2))),
                2 => return None,
                _ => {}
            }
            match rx.recv().await {
                // A special token's text is empty, unless it is the last and carries text
                // held back for the stop sequences (see `engine`).
                Some(Event::Token { text, .. }) => Some((
                    SseEvent::default().data(chunk(Some(&text), None).to_string()),
                    (rx, 0),
                )),
                Some(Event::Done { finish, .. }) => {
                    let mut last = chunk(None, Some(openai_finish(finish)));
                    // As the reply without `stream` carries them.
                    if !warnings.is_empty() {
                        last["warnings"] = json!(warnings);
                    }
                    Some((SseEvent::default().data(last.to_string()), (rx, 1)))
                }
                None => None,
            }
        }
    });
    Ok(sse(events))
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
    }

    #[test]
    fn openai_s_default_of_16_tokens_keeps_within_the_server_s_limit() {
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
        assert_eq!(openai_params(knobs(), 8).unwrap().max_new_tokens, Some(8));
        assert_eq!(
            openai_params(knobs(), 200).unwrap().max_new_tokens,
            Some(16)
        );
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
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
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
            let (status, text) = s.post(path, body).await;
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                (status, v["error"]["param"].as_str()),
                (422, Some(param)),
                "{text}"
            );
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
            status == 422 && text.contains(r#""param":"temperature""#),
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
            // A known author: no warnings at all.
            body["author"] = json!("twain");
            body["stream"] = json!(true);
            let (_, text) = s.post(path, body).await;
            assert!(
                events(&text).iter().all(|e| e.get("warnings").is_none()),
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
        s.stop().await;
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
}
