//! The REST API. A small model is trained once on part of the real corpus and deployed with
//! `run --no-serve` (which smoke-tests a live server); the router is then driven without a
//! socket for every route and every error class, and `orchestrate serve` once over TCP.
#![cfg(feature = "model")]

mod common;
#[path = "common/servers.rs"]
mod servers;
use common::{stage_status, Sandbox};

use std::path::PathBuf;
use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use orchestrate_serve::ServeOptions;
use serde_json::{json, Value};
use tower::ServiceExt;

const PIPELINE: &str = r#"
name: served
storage: file://store
stages:
  corpus:
    kind: ingest
    with:
      sources:
        - { path: "/usr/share/games/fortunes/p*", lang: en }
        - { path: "/usr/share/games/fortunes/ru/[a-c]*", lang: ru }
      split: { val: 0.05, test: 0.05 }
  tokenizer:
    kind: bpe
    inputs: { corpus: corpus }
    with: { vocab_size: 400, author_tokens: 8 }
  model:
    kind: train
    inputs: { corpus: corpus, tokenizer: tokenizer }
    resources: { device: cpu }
    with:
      d_model: 32
      n_heads: 2
      enc_layers: 1
      dec_layers: 1
      d_ff: 64
      # Long enough that an abandoned stream (below) can be seen to stop early even on a
      # loaded machine: this model decodes a token in microseconds, and 8000 of them (the
      # later ones attending to thousands) take seconds.
      max_len: 8192
      batch: 8
      steps: 10
      warmup: 2
      eval_every: 10
      eval_batches: 1
      max_records: 300
  deploy:
    kind: deploy
    inputs: { model: model }
    with: { name: tiny, port: 0 }
"#;

/// The sandbox with the pipeline run once, and the deploy artifact's directory.
fn deployed() -> &'static (Sandbox, PathBuf) {
    static ONCE: OnceLock<(Sandbox, PathBuf)> = OnceLock::new();
    ONCE.get_or_init(|| {
        let sb = Sandbox::new();
        sb.write("p.yaml", PIPELINE);
        let r = sb.run(&["run", "p.yaml", "--no-serve"]);
        assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
        let dir = sb
            .path()
            .join(".orchestrate/artifacts")
            .read_dir()
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("deployment.json").exists())
            .unwrap_or_else(|| copy_artifact(&sb, "deploy"));
        (sb, dir)
    })
}

/// An artifact's files rebuilt from the store's manifest and blobs.
fn copy_artifact(sb: &Sandbox, stage: &str) -> PathBuf {
    let m = sb.stage_manifest(stage);
    let out = sb.path().join(format!("copy-{stage}"));
    for f in m["files"].as_array().unwrap() {
        let hex = f["digest"].as_str().unwrap().trim_start_matches("blake3:");
        let dest = out.join(f["path"].as_str().unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(
            sb.path().join(format!("store/blobs/{}/{hex}", &hex[..2])),
            dest,
        )
        .unwrap();
    }
    out
}

fn app(opts: ServeOptions) -> axum::Router {
    let (_, dir) = deployed();
    orchestrate_serve::app(&dir.join("model"), &opts).unwrap()
}

fn opts() -> ServeOptions {
    ServeOptions {
        name: "tiny".into(),
        max_new_tokens: Some(200),
        ..ServeOptions::default()
    }
}

/// A `/generate_stream` request's body, its events left for the test to read (or not).
async fn open_stream(app: &axum::Router, request: &'static str) -> Body {
    let req = Request::builder()
        .method("POST")
        .uri("/generate_stream")
        .header("content-type", "application/json")
        .body(Body::from(request))
        .unwrap();
    app.clone().oneshot(req).await.unwrap().into_body()
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (StatusCode, Vec<(String, String)>, String) {
    call_with(app, method, path, body, &[]).await
}

async fn call_with(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (StatusCode, Vec<(String, String)>, String) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(
            body.map(|b| Body::from(b.to_string()))
                .unwrap_or_else(Body::empty),
        )
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let hs = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, hs, String::from_utf8_lossy(&bytes).into_owned())
}

fn j(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|l| l.trim().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_smoke_tested_a_live_server() {
    let (sb, dir) = deployed();
    assert_eq!(stage_status(&sb.last_run(), "deploy"), "ran");
    let d: Value = j(&std::fs::read_to_string(dir.join("deployment.json")).unwrap());
    assert_eq!(d["name"], "tiny");
    assert!(d["smoke"]["generated_tokens"].as_u64().unwrap() > 0, "{d}");
    assert!(d["smoke"]["stream_events"].as_u64().unwrap() > 0, "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers() {
    let app = app(opts());
    let (s, _, b) = call(&app, "GET", "/health", None).await;
    assert_eq!((s, j(&b)["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, _, b) = call(&app, "GET", "/info", None).await;
    let info = j(&b);
    assert_eq!(s, StatusCode::OK);
    assert_eq!(info["model_id"], "tiny");
    assert_eq!(info["max_input_tokens"], 8192);

    // `ignore_eos` (vLLM's parameter, for benchmarks): every token asked for, whatever comes.
    let (s, _, b) = call(&app, "POST", "/generate", Some(r#"{"inputs": "x", "parameters": {"max_new_tokens": 20, "details": true, "ignore_eos": true}}"#)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(j(&b)["details"]["generated_tokens"], 20, "{b}");
    assert_eq!(j(&b)["details"]["finish_reason"], "length", "{b}");

    let (s, _, b) = call(&app, "POST", "/generate", Some(r#"{"inputs": "A fool and his money", "parameters": {"max_new_tokens": 12, "details": true, "author": "Nobody Known"}}"#)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let g = j(&b);
    let d = &g["details"];
    assert!(
        ["length", "eos_token"].contains(&d["finish_reason"].as_str().unwrap()),
        "{g}"
    );
    let n = d["generated_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&n));
    assert_eq!(d["tokens"].as_array().unwrap().len() as u64, n);
    assert!(d["tokens"][0]["logprob"].as_f64().unwrap() <= 0.0);
    assert!(
        d["prefill"].as_array().unwrap().len() >= 3,
        "control tokens and the prompt: {g}"
    );
    assert!(
        g["warnings"][0]
            .as_str()
            .unwrap()
            .contains("`Nobody Known`"),
        "an unknown author is said: {g}"
    );
    assert!(g["generated_text"].is_string());

    // Greedy is deterministic; sampling with a seed is too.
    let body = r#"{"inputs": "Life is", "parameters": {"max_new_tokens": 10, "do_sample": true, "temperature": 0.9, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.2, "seed": 7, "details": true}}"#;
    let a = j(&call(&app, "POST", "/generate", Some(body)).await.2);
    let b2 = j(&call(&app, "POST", "/generate", Some(body)).await.2);
    assert_eq!(a["generated_text"], b2["generated_text"]);
    assert_eq!(a["details"]["seed"], 7);

    let (s, _, b) = call(
        &app,
        "POST",
        "/",
        Some(r#"{"inputs": "Жизнь", "parameters": {"max_new_tokens": 4}}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(j(&b)[0]["generated_text"].is_string(), "{b}");

    let (s, hs, b) = call(
        &app,
        "POST",
        "/generate_stream",
        Some(r#"{"inputs": "Never", "parameters": {"max_new_tokens": 6, "details": true}}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(hs
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream")));
    let events: Vec<Value> = sse_data(&b).iter().map(|d| j(d)).collect();
    assert!(!events.is_empty(), "{b}");
    let last = events.last().unwrap();
    assert!(
        last["generated_text"].is_string()
            && last["details"]["generated_tokens"].as_u64().unwrap() >= 1,
        "{b}"
    );
    assert!(events[..events.len() - 1]
        .iter()
        .all(|e| e["generated_text"].is_null() && e["token"]["id"].is_u64()));
    let streamed: String = events
        .iter()
        .map(|e| e["token"]["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        streamed,
        last["generated_text"].as_str().unwrap(),
        "the pieces add up to the text"
    );

    let (s, _, b) = call(
        &app,
        "POST",
        "/",
        Some(r#"{"inputs": "Never", "stream": true, "parameters": {"max_new_tokens": 3}}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(!sse_data(&b).is_empty());

    let (s, _, b) = call(
        &app,
        "POST",
        "/tokenize",
        Some(r#"{"inputs": "hello world"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let toks = j(&b);
    assert!(
        toks.as_array().unwrap().len() >= 2 && toks[0]["start"] == 0,
        "{b}"
    );

    let (s, _, b) = call(&app, "GET", "/v1/models", None).await;
    assert_eq!(
        (s, j(&b)["data"][0]["id"].as_str()),
        (StatusCode::OK, Some("tiny"))
    );
    let (s, _, b) = call(&app, "GET", "/v1/models/tiny", None).await;
    assert_eq!((s, j(&b)["id"].as_str()), (StatusCode::OK, Some("tiny")));
    // A name that does not decode to UTF-8: OpenAI's JSON, naming the model.
    let (s, _, b) = call(&app, "GET", "/v1/models/%FF", None).await;
    assert_eq!(
        (s, j(&b)["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("model")),
        "{b}"
    );
    let (s, _, b) = call(&app, "GET", "/v1/models/other", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert!(
        j(&b)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`tiny`"),
        "{b}"
    );
    // `details` lists each token with its own text, though a stream holds text back for
    // the stop sequences: the texts add up to the reply.
    let (s, _, b) = call(
        &app,
        "POST",
        "/generate",
        Some(r#"{"inputs": "Time", "parameters": {"max_new_tokens": 6, "stop": ["zzzzzz"], "details": true}}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v = j(&b);
    let pieces: String = v["details"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["text"].as_str().unwrap())
        .collect();
    assert_eq!(pieces, v["generated_text"].as_str().unwrap(), "{b}");
    // OpenAI's flags may be null (unset); 0 top_logprobs, and TGI parameters at the value
    // that changes nothing, are taken.
    for (path, body) in [
        (
            "/v1/completions",
            r#"{"prompt": "Time", "max_tokens": 2, "stream": null}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "Time"}], "max_tokens": 2, "stream": null, "top_logprobs": 0, "logprobs": false}"#,
        ),
        (
            "/generate",
            r#"{"inputs": "Time", "parameters": {"max_new_tokens": 2, "typical_p": 1.0, "watermark": false, "top_n_tokens": 0, "grammar": null}}"#,
        ),
    ] {
        let (s, _, b) = call(&app, "POST", path, Some(body)).await;
        assert_eq!(s, StatusCode::OK, "{path} {body}: {b}");
    }
    let (s, _, b) = call(
        &app,
        "POST",
        "/v1/completions",
        Some(r#"{"model": "tiny", "prompt": "Time", "max_tokens": 5, "temperature": 0}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let c = j(&b);
    assert_eq!(c["object"], "text_completion");
    assert!(["stop", "length"].contains(&c["choices"][0]["finish_reason"].as_str().unwrap()));
    assert!(c["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    // Temperature 0 is greedy even beside top_p or top_k (as OpenAI's clients send it):
    // the same text as plain greedy decoding, every time.
    let greedy = c["choices"][0]["text"].clone();
    for extra in [r#""top_p": 0.5"#, r#""top_k": 3"#] {
        let body = format!(
            r#"{{"model": "tiny", "prompt": "Time", "max_tokens": 5, "temperature": 0, {extra}}}"#
        );
        let (s, _, b) = call(&app, "POST", "/v1/completions", Some(&body)).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(j(&b)["choices"][0]["text"], greedy, "{extra}");
    }
    let (s, _, b) = call(
        &app,
        "POST",
        "/v1/completions",
        Some(r#"{"prompt": "Time", "max_tokens": 5, "stream": true, "seed": 1}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let data = sse_data(&b);
    assert_eq!(data.last().unwrap(), "[DONE]", "{b}");
    assert!(j(&data[data.len() - 2])["choices"][0]["finish_reason"].is_string());
    let (s, _, b) = call(&app, "POST", "/v1/chat/completions", Some(r#"{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "Love is"}], "max_tokens": 5, "temperature": 0}"#)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(j(&b)["choices"][0]["message"]["role"], "assistant");
    let (s, _, b) = call(&app, "POST", "/v1/chat/completions", Some(r#"{"messages": [{"role": "user", "content": "Love"}], "max_tokens": 3, "stream": true}"#)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(sse_data(&b).last().unwrap(), "[DONE]");

    let (s, _, b) = call(&app, "GET", "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    for family in [
        "orchestrate_http_requests_total{route=\"/generate\",status=\"200\"}",
        "orchestrate_http_request_duration_seconds_bucket",
        "orchestrate_time_to_first_token_seconds_count",
        "orchestrate_generated_tokens_total",
        "orchestrate_queue_depth",
        "orchestrate_batch_size_count",
        "orchestrate_model_info{model=\"tiny\"",
    ] {
        assert!(b.contains(family), "{family} missing from\n{b}");
    }
    let (s, _, b) = call(&app, "GET", "/docs", None).await;
    assert!(s == StatusCode::OK && b.contains("/openapi.json") && !b.contains("https://"));
    let (s, _, b) = call(&app, "GET", "/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(j(&b)["paths"]["/generate_stream"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_class_is_json_and_names_the_field() {
    let app = app(ServeOptions {
        max_new_tokens: Some(40),
        max_input_tokens: Some(20),
        max_body_bytes: 2000,
        ..opts()
    });
    let cases: &[(&str, &str, u16, &str)] = &[
        (
            "/generate",
            r#"{"inputs": "x", "parameters": {"temperature": -1}}"#,
            422,
            "parameters.temperature",
        ),
        (
            "/generate",
            r#"{"inputs": "x", "parameters": {"temperature": "hot"}}"#,
            422,
            "parameters.temperature",
        ),
        (
            "/generate",
            r#"{"inputs": "x", "parameters": {"max_new_tokens": 41}}"#,
            422,
            "parameters.max_new_tokens",
        ),
        (
            "/generate",
            r#"{"inputs": "x", "parameters": {"max_new_tokens": 0}}"#,
            422,
            "parameters.max_new_tokens",
        ),
        (
            "/generate",
            r#"{"inputs": "x", "parameters": {"top_p": 1.5}}"#,
            422,
            "parameters.top_p",
        ),
        (
            "/generate",
            r#"{"inputs": "x", "parameters": {"top_k": 0}}"#,
            422,
            "parameters.top_k",
        ),
        (
            "/generate",
            r#"{"inputs": "x", "parameters": {"repetition_penalty": 0}}"#,
            422,
            "parameters.repetition_penalty",
        ),
        (
            "/generate",
            r#"{"inputs": "x", "parameters": {"lang": "fr"}}"#,
            422,
            "parameters.lang",
        ),
        (
            "/generate",
            r#"{"inputs": "x", "parameters": {"best_of": 2}}"#,
            422,
            "parameters.best_of",
        ),
        ("/generate", r#"{"parameters": {}}"#, 422, "inputs"),
        ("/generate", r#"{"inputs": 5}"#, 422, "inputs"),
        ("/generate", r#"{"inputs": "x""#, 400, "body"),
        ("/generate", "not json at all", 400, "body"),
        // One document, not the first of several.
        ("/generate", r#"{"inputs": "x"} junk"#, 400, "body"),
        (
            "/generate",
            r#"{"inputs": "x"}{"inputs": "y"}"#,
            400,
            "body",
        ),
        // TGI parameters this server does not implement are refused by name, not dropped.
        (
            "/generate",
            r#"{"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a+"}}}"#,
            422,
            "parameters.grammar",
        ),
        (
            "/generate",
            r#"{"inputs": "x", "parameters": {"typical_p": 1.5}}"#,
            422,
            "parameters.typical_p",
        ),
        (
            "/generate",
            r#"{"inputs": "x", "parameters": {"repetition_penalty": 1.2e-38, "do_sample": true}}"#,
            422,
            "parameters.repetition_penalty",
        ),
        (
            "/generate_stream",
            r#"{"inputs": "x", "parameters": {"top_p": -1}}"#,
            422,
            "parameters.top_p",
        ),
        ("/v1/completions", r#"{"prompt": "x", "n": 2}"#, 400, "n"),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 999}"#,
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            r#"{"prompt": ["a", "b"], "stream": true}"#,
            400,
            "prompt",
        ),
        ("/v1/completions", r#"{"prompt": []}"#, 400, "prompt"),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "system", "content": "x"}]}"#,
            400,
            "messages",
        ),
        ("/tokenize", r#"{}"#, 422, "inputs"),
    ];
    for (path, body, status, field) in cases {
        let (s, _, b) = call(&app, "POST", path, Some(body)).await;
        assert_eq!(s.as_u16(), *status, "{path} {body}: {b}");
        let v = j(&b);
        let (msg, f) = if path.starts_with("/v1/") {
            (v["error"]["message"].as_str(), v["error"]["param"].as_str())
        } else {
            (v["error"].as_str(), v["field"].as_str())
        };
        assert!(msg.is_some_and(|m| !m.is_empty()), "{path} {body}: {b}");
        if !field.is_empty() {
            assert!(
                f.is_some_and(|f| f.contains(field)),
                "{path} {body}: field {f:?} in {b}"
            );
        }
    }
    // Too long a prompt: 413 naming it; too big a body: 413.
    let long = format!(r#"{{"inputs": "{}"}}"#, "word ".repeat(100));
    let (s, _, b) = call(&app, "POST", "/generate", Some(&long)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
    assert_eq!(j(&b)["field"], "inputs");
    // Under /v1 as OpenAI answers it: a 400 its clients raise as BadRequestError, with the
    // code LangChain and LiteLLM look for.
    let long = format!(r#"{{"prompt": "{}"}}"#, "word ".repeat(100));
    let (s, _, b) = call(&app, "POST", "/v1/completions", Some(&long)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let e = &j(&b)["error"];
    assert_eq!(
        (&e["param"], &e["type"], &e["code"]),
        (
            &json!("prompt"),
            &json!("invalid_request_error"),
            &json!("context_length_exceeded")
        ),
        "{b}"
    );
    let huge = format!(r#"{{"inputs": "{}"}}"#, "x".repeat(5000));
    let (s, _, b) = call(&app, "POST", "/generate", Some(&huge)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
    assert_eq!(j(&b)["field"], "body");
    let (s, _, b) = call(&app, "GET", "/nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(j(&b)["error"].is_string());
    let (s, _, b) = call(&app, "GET", "/generate", None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        j(&b)["error_type"],
        "method_not_allowed",
        "a JSON body: {b}"
    );
    let (s, _, b) = call(&app, "GET", "/v1/nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(j(&b)["error"]["message"].is_string(), "OpenAI's shape: {b}");
}

/// A stream is timed to its last event, not to its head (which leaves before any token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_s_duration_is_timed_to_its_last_event() {
    let app = app(opts());
    let streams = |m: &str, suffix: &str| -> Option<f64> {
        let key = format!(
            "orchestrate_http_request_duration_seconds_{suffix}{{route=\"/generate_stream\",stream=\"true\"}} "
        );
        m.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .map(|v| v.parse().unwrap())
    };
    let mut body = open_stream(
        &app,
        r#"{"inputs": "x", "parameters": {"max_new_tokens": 5}}"#,
    )
    .await;
    assert!(body.frame().await.unwrap().unwrap().is_data());
    let (_, _, m) = call(&app, "GET", "/metrics", None).await;
    assert_eq!(
        streams(&m, "count"),
        None,
        "recorded while still streaming:\n{m}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    while body.frame().await.is_some() {}
    drop(body);
    let (_, _, m) = call(&app, "GET", "/metrics", None).await;
    assert_eq!(streams(&m, "count"), Some(1.0), "{m}");
    assert!(streams(&m, "sum").unwrap() >= 0.3, "{m}");
    // A plain answer is labelled apart, so alerts on latency can leave streams out.
    assert!(
        m.contains(
            "orchestrate_http_request_duration_seconds_count{route=\"/metrics\",stream=\"false\"}"
        ),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_and_cors() {
    let app = app(ServeOptions {
        api_key: Some("s3cret".into()),
        cors_origins: Some(vec!["https://ui.example".into()]),
        ..opts()
    });
    let body = r#"{"inputs": "x", "parameters": {"max_new_tokens": 2}}"#;
    let (s, _, b) = call(&app, "POST", "/generate", Some(body)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    let (s, _, _) = call_with(
        &app,
        "POST",
        "/generate",
        Some(body),
        &[("authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = call_with(
        &app,
        "POST",
        "/generate",
        Some(body),
        &[("authorization", "Bearer s3cret")],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // A Bearer token that is not the key (a Hugging Face token huggingface_hub sends by
    // itself) does not hide the right X-API-Key beside it.
    let (s, _, _) = call_with(
        &app,
        "POST",
        "/generate",
        Some(body),
        &[
            ("authorization", "Bearer hf_other"),
            ("x-api-key", "s3cret"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, b) = call_with(
        &app,
        "POST",
        "/v1/completions",
        Some(r#"{"prompt": "x"}"#),
        &[("x-api-key", "nope")],
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        j(&b)["error"]["message"].is_string(),
        "OpenAI's error shape under /v1: {b}"
    );
    let (s, _, _) = call(&app, "GET", "/health", None).await;
    assert_eq!(s, StatusCode::OK, "probes need no key");
    let (_, hs, _) = call_with(
        &app,
        "GET",
        "/health",
        None,
        &[("origin", "https://ui.example")],
    )
    .await;
    assert!(hs
        .iter()
        .any(|(k, v)| k == "access-control-allow-origin" && v == "https://ui.example"));
    // A page's script may read a 429's Retry-After.
    assert!(
        hs.iter().any(|(k, v)| k == "access-control-expose-headers"
            && v.to_ascii_lowercase().contains("retry-after")),
        "{hs:?}"
    );

    // A browser's preflight for a request with X-API-Key, which the README offers, and
    // with the headers an SDK adds of its own (the OpenAI one's `x-stainless-*`).
    let (_, hs, _) = call_with(
        &app,
        "OPTIONS",
        "/generate",
        None,
        &[
            ("origin", "https://ui.example"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "x-api-key,content-type,x-stainless-os",
            ),
        ],
    )
    .await;
    assert!(
        hs.iter().any(|(k, v)| k == "access-control-allow-headers"
            && v.contains("x-api-key")
            && v.contains("x-stainless-os")),
        "{hs:?}"
    );

    // `*`: any origin (tower-http panics on `*` in a list of origins).
    let any = self::app(ServeOptions {
        cors_origins: Some(vec!["*".into()]),
        ..opts()
    });
    let (_, hs, _) = call_with(
        &any,
        "GET",
        "/health",
        None,
        &[("origin", "https://elsewhere.example")],
    )
    .await;
    assert!(hs
        .iter()
        .any(|(k, v)| k == "access-control-allow-origin" && v == "*"));
    for bad in [
        "ui.example",
        "https://ui.example/",
        "https://ui.example/app",
    ] {
        let problem = orchestrate_serve::api::cors_origin_problem(bad);
        assert!(
            problem.as_deref().is_some_and(|p| p.contains(bad)),
            "{bad}: {problem:?}"
        );
    }
    assert_eq!(
        orchestrate_serve::api::cors_origin_problem("http://127.0.0.1:3000"),
        None
    );

    // Without configuration, no CORS headers at all.
    let plain = self::app(opts());
    let (_, hs, _) = call_with(
        &plain,
        "GET",
        "/health",
        None,
        &[("origin", "https://ui.example")],
    )
    .await;
    assert!(!hs.iter().any(|(k, _)| k.starts_with("access-control")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_429_and_a_gone_client_frees_its_slot() {
    let app = app(ServeOptions {
        max_batch: 1,
        queue: 1,
        max_new_tokens: Some(8000),
        ..opts()
    });
    let body = r#"{"inputs": "x", "parameters": {"max_new_tokens": 200, "details": true}}"#;
    let calls: Vec<_> = (0..8)
        .map(|_| call(&app, "POST", "/generate", Some(body)))
        .collect();
    let results = futures::future::join_all(calls).await;
    let busy: Vec<_> = results
        .iter()
        .filter(|r| r.0 == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert!(
        !busy.is_empty(),
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert!(busy[0]
        .1
        .iter()
        .any(|(k, v)| k == "retry-after" && v == "1"));
    assert_eq!(j(&busy[0].2)["error_type"], "overloaded");
    assert!(results
        .iter()
        .all(|r| r.0 == StatusCode::OK || r.0 == StatusCode::TOO_MANY_REQUESTS));

    // A stream read for one event and dropped: the decoder stops that row early.
    let tokens = |m: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix("orchestrate_generated_tokens_total "))
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = tokens(&call(&app, "GET", "/metrics", None).await.2);
    let mut body = open_stream(
        &app,
        r#"{"inputs": "x", "parameters": {"max_new_tokens": 8000, "ignore_eos": true}}"#,
    )
    .await;
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    // The next request is served (the slot is free) and the dropped row stopped early.
    let (s, _, _) = call(
        &app,
        "POST",
        "/generate",
        Some(r#"{"inputs": "y", "parameters": {"max_new_tokens": 1}}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let after = tokens(&call(&app, "GET", "/metrics", None).await.2);
    // The decoder runs ahead of the reader (a few hundred tokens of this tiny model before
    // the drop reaches it, more on a loaded machine), but not to the end of the 8000 it was
    // asked for, past end of text too (+1: the request after it).
    assert!(
        after - before < 8001.0,
        "the abandoned stream went on to its end: {before} → {after}"
    );
}

#[test]
fn orchestrate_serve_listens_and_stops_gracefully_on_sigterm() {
    let (sb, _) = deployed();
    let (mut child, url) = serving(
        sb,
        &["serve", "deploy", "--pipeline", "p.yaml", "--port", "0"],
    );
    let (status, body) = servers::http(
        "POST",
        &format!("{url}/generate"),
        Some(r#"{"inputs": "Hello", "parameters": {"max_new_tokens": 3}}"#),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(j(&body)["generated_text"].is_string());
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let code = child.wait().unwrap();
    assert_eq!(code.code(), Some(0));
}

/// The server `run` ends with reads `ORCHESTRATE_API_KEY` as `serve` does: a key set for
/// the one was silently not required by the other.
#[test]
fn the_server_run_ends_with_requires_the_key_from_the_environment() {
    // A sandbox of its own with a copy of the store (every stage cached), so that this
    // run is not the shared sandbox's last run, which other tests read.
    let (shared, _) = deployed();
    let sb = Sandbox::new();
    sb.write("p.yaml", PIPELINE);
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(shared.path().join("store"))
        .arg(sb.path())
        .status()
        .unwrap();
    assert!(copied.success());
    let (mut child, url, _) =
        serving_with_key(&sb, &["run", "p.yaml", "--no-tracking"], Some("s3cret"));
    let info = servers::http("GET", &format!("{url}/info"), None);
    let health = servers::http("GET", &format!("{url}/health"), None);
    // Stopped before anything is asserted: a failing test must not leave it serving.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let code = child.wait().unwrap().code();
    let (status, body) = info.unwrap();
    assert_eq!(status, 401, "{body}");
    let (status, body) = health.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(code, Some(0));
}

/// A deployment whose key variable is unset is refused by `run` before any stage runs,
/// not after the training: its server could not start.
#[test]
fn run_refuses_an_unset_key_variable_before_any_stage_runs() {
    let sb = Sandbox::new();
    sb.write(
        "p.yaml",
        &PIPELINE.replace(
            "with: { name: tiny, port: 0 }",
            "with: { name: tiny, port: 0, api_key_env: ORCHESTRATE_TEST_UNSET_KEY }",
        ),
    );
    let r = keyed(&sb, &["run", "p.yaml", "--no-tracking"], None)
        .env_remove("ORCHESTRATE_TEST_UNSET_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("$ORCHESTRATE_TEST_UNSET_KEY") && stderr.contains("--no-serve"),
        "{stderr}"
    );
    assert!(sb.runs().is_empty(), "nothing ran");
}

/// `orchestrate serve ARGS` started: the child and the URL it says it listens at.
fn serving(sb: &Sandbox, args: &[&str]) -> (std::process::Child, String) {
    let (child, url, _) = serving_logged(sb, args);
    (child, url)
}

/// `serving`, and the lines the server writes to stderr after it listens.
fn serving_logged(
    sb: &Sandbox,
    args: &[&str],
) -> (
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    serving_with_key(sb, args, None)
}

/// `orchestrate ARGS` with `ORCHESTRATE_API_KEY` set to `key`, or unset for None (never
/// the environment's own).
fn keyed(sb: &Sandbox, args: &[&str], key: Option<&str>) -> std::process::Command {
    let mut cmd = sb.cmd(args);
    match key {
        Some(key) => cmd.env("ORCHESTRATE_API_KEY", key),
        None => cmd.env_remove("ORCHESTRATE_API_KEY"),
    };
    cmd
}

/// `serving_logged` with `ORCHESTRATE_API_KEY` set to `key` (unset for None).
fn serving_with_key(
    sb: &Sandbox,
    args: &[&str],
    key: Option<&str>,
) -> (
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    let mut child = keyed(sb, args, key)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let url = loop {
        let line = lines
            .next()
            .expect("the server says where it listens")
            .unwrap();
        if let Some(rest) = line.split("at http://").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().unwrap());
        }
    };
    // The rest of stderr is drained, or a full pipe would block the server (sent on while
    // anyone listens).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, url, rx)
}

/// Waits (a minute at most) for a line of the server's stderr that contains `text`.
fn said(log: &std::sync::mpsc::Receiver<String>, text: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match log.recv_timeout(left) {
            Ok(line) if line.contains(text) => return line,
            Ok(_) => {}
            Err(e) => panic!("the server did not say `{text}`: {e}"),
        }
    }
}

/// A connection that sent half a request head, once the server has accepted it: a request
/// on a later connection has been answered, and connections are accepted in order.
fn stalled_connection(url: &str) -> std::net::TcpStream {
    let mut stalled = std::net::TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    std::io::Write::write_all(&mut stalled, b"POST /generate HTTP/1.1\r\nHost: x\r\n").unwrap();
    let (status, body) = servers::http("GET", &format!("{url}/health"), None).unwrap();
    assert_eq!(status, 200, "{body}");
    stalled
}

/// The child's exit code within `secs` seconds, else it is killed and the test fails.
fn exits_within(child: &mut std::process::Child, secs: u64, what: &str) -> Option<i32> {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if started.elapsed() > std::time::Duration::from_secs(secs) {
            child.kill().unwrap();
            panic!("{what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_second_sigterm_stops_at_once_while_a_stalled_client_drains() {
    let (sb, _) = deployed();
    let (mut child, url, log) = serving_logged(
        sb,
        &["serve", "deploy", "--pipeline", "p.yaml", "--port", "0"],
    );
    // Half a request head: the drain would wait for it (up to its read timeout, 30 s).
    let stalled = stalled_connection(&url);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    // The first signal has been taken (a second one sent before could merge with it).
    said(
        &log,
        "stopping: finishing the requests in flight (up to 30 s",
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first SIGTERM drains"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let code = exits_within(&mut child, 20, "a second SIGTERM was ignored");
    assert_eq!(code, Some(130));
    drop(stalled);
}

#[test]
fn the_drain_and_read_timeouts_are_options() {
    let (sb, _) = deployed();
    let (mut child, url, log) = serving_logged(
        sb,
        &[
            "serve",
            "deploy",
            "--pipeline",
            "p.yaml",
            "--port",
            "0",
            "--drain-timeout",
            "1s",
            "--read-timeout",
            "10m",
        ],
    );
    // Longer than the test waits to read: only the drain deadline can end it.
    let stalled = stalled_connection(&url);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    said(&log, "(up to 1 s;");
    let code = exits_within(&mut child, 60, "the drain outlasted --drain-timeout");
    assert_eq!(code, Some(0));
    drop(stalled);
    // A read timeout of 0 would cut every request off: refused before anything loads.
    let out = sb
        .cmd(&[
            "serve",
            "deploy",
            "--pipeline",
            "p.yaml",
            "--read-timeout",
            "0s",
        ])
        .env_remove("ORCHESTRATE_API_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("read_timeout"), "{err}");
}

#[test]
fn a_model_served_from_the_store_is_named_by_its_stage_and_digest() {
    let (sb, _) = deployed();
    let (mut child, url) = serving(
        sb,
        &["serve", "model", "--pipeline", "p.yaml", "--port", "0"],
    );
    let (status, body) = servers::http("GET", &format!("{url}/info"), None).unwrap();
    let (_, models) = servers::http("GET", &format!("{url}/v1/models"), None).unwrap();
    let (_, metrics) = servers::http("GET", &format!("{url}/metrics"), None).unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    exits_within(&mut child, 60, "serve did not stop");
    assert_eq!(status, 200, "{body}");
    let info = j(&body);
    assert_eq!(info["model_id"], "model", "{info}");
    let digest = sb.stage_manifest("model")["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(info["model_sha"], digest.as_str(), "{info}");
    assert_eq!(j(&models)["data"][0]["id"], "model", "{models}");
    assert!(
        metrics.contains("orchestrate_model_info{model=\"model\""),
        "{metrics}"
    );
}

/// A stage whose artifact no server can load is refused by its kind (before it would be
/// downloaded); a directory that is not there, as such.
#[test]
fn serving_a_tokenizer_or_nothing_is_refused_by_name() {
    let (sb, _) = deployed();
    let (code, err) = refused(sb, &["serve", "tokenizer", "--pipeline", "p.yaml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("stage `tokenizer` produced a Tokenizer, and serve needs a Model"),
        "{err}"
    );
    let empty = Sandbox::new();
    let (code, err) = refused(&empty, &["serve", "no/such/dir"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("there is no directory no/such/dir"), "{err}");
}

/// `orchestrate serve ARGS` that must refuse to start: its exit code and stderr (a server
/// that starts anyway is killed after 60 s and fails the test).
fn refused(sb: &Sandbox, args: &[&str]) -> (Option<i32>, String) {
    refused_with_key(sb, args, None)
}

/// `refused` with `ORCHESTRATE_API_KEY` set to `key` (unset for None).
fn refused_with_key(sb: &Sandbox, args: &[&str], key: Option<&str>) -> (Option<i32>, String) {
    let mut child = keyed(sb, args, key)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("`orchestrate {}` started serving", args.join(" "));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn serve_refuses_a_missing_key_and_a_bad_origin_before_listening() {
    let (sb, dir) = deployed();
    // The deployment, asking for its key from a variable nobody set.
    let keyed = sb.path().join("keyed");
    std::fs::create_dir_all(keyed.join("model")).unwrap();
    for entry in std::fs::read_dir(dir.join("model")).unwrap().flatten() {
        std::fs::copy(entry.path(), keyed.join("model").join(entry.file_name())).unwrap();
    }
    let mut deployment: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("deployment.json")).unwrap())
            .unwrap();
    deployment["params"]["api_key_env"] = "ORCHESTRATE_TEST_UNSET_KEY".into();
    std::fs::write(keyed.join("deployment.json"), deployment.to_string()).unwrap();
    let keyed = keyed.to_str().unwrap();
    let (code, err) = refused(sb, &["serve", keyed, "--port", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("$ORCHESTRATE_TEST_UNSET_KEY"), "{err}");
    // An empty ORCHESTRATE_API_KEY is unset, not "serve without a key" (it was, through
    // clap, which passes an empty variable on as a value).
    let (code, err) = refused_with_key(sb, &["serve", keyed, "--port", "0"], Some(""));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("$ORCHESTRATE_TEST_UNSET_KEY"), "{err}");
    let (code, err) = refused(
        sb,
        &[
            "serve",
            keyed,
            "--port",
            "0",
            "--api-key",
            "k",
            "--cors-origin",
            "ui.example/",
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--cors-origin") && err.contains("ui.example/"),
        "{err}"
    );
}

#[test]
fn serve_s_bad_options_exit_2() {
    let (sb, dir) = deployed();
    let dir = dir.to_str().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    for (args, says) in [
        (vec!["--port", port.as_str()], "cannot listen"),
        (
            vec!["--host", "no-such-host.invalid", "--port", "0"],
            "cannot listen",
        ),
        (vec!["--port", "0", "--device", "tpu"], "device"),
        (vec!["--port", "0", "--max-batch", "0"], "max_batch"),
        (vec!["--port", "0", "--queue", "0"], "queue"),
        // Beyond what the channels and the clock can hold: refused, not a panic later.
        (
            vec!["--port", "0", "--queue", "3000000000000000000"],
            "queue at most",
        ),
        (
            vec!["--port", "0", "--read-timeout", "9999999999999999999s"],
            "read_timeout may be at most a day",
        ),
        // HTTP headers carry the key: one they cannot would refuse every request.
        (vec!["--port", "0", "--api-key", "clé"], "printable ASCII"),
        (vec!["--port", "0", "--api-key", " key"], "printable ASCII"),
    ] {
        let mut all = vec!["serve", dir];
        all.extend(&args);
        let (code, err) = refused(sb, &all);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    drop(taken);
}

/// Every query of the Grafana dashboard names a metric a live server exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_metrics_the_server_exports() {
    let Some(venv) = servers::venv() else { return };
    let app = app(opts());
    let (s, _, _) = call(
        &app,
        "POST",
        "/generate",
        Some(r#"{"inputs": "x", "parameters": {"max_new_tokens": 2}}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, metrics) = call(&app, "GET", "/metrics", None).await;
    let file = deployed().0.path().join("metrics.prom");
    std::fs::write(&file, metrics).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(venv.join("bin/python"))
        .arg(root.join("tests/deploy_files/check.py"))
        .args(["dashboard", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
