//! A closed-loop load generator for bench/serve.sh: N clients, each sending its next
//! `/generate` request as soon as the last one is answered, for a fixed time (and at most a
//! fixed number of requests). Loopback only. Prints one JSON line.
//!
//!     cargo run --release -p orchestrate-serve --example load -- URL CLIENTS SECONDS [MAX_NEW] [MAX_REQUESTS]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let clients: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let seconds: f64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let max_new: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(50);
    let max_requests: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    assert!(
        url.starts_with("http://127.0.0.1") || url.starts_with("http://localhost"),
        "loopback only"
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();
    let prompts = [
        "A fool and his money",
        "The best way to predict the future",
        "Жизнь прекрасна, когда",
        "Never put off till tomorrow",
        "Москва не сразу",
    ];
    let sent = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(
        std::collections::BTreeMap::<String, usize>::new(),
    ));
    let tokens = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, url, sent, latencies, errors, tokens) = (
            http.clone(),
            url.clone(),
            sent.clone(),
            latencies.clone(),
            errors.clone(),
            tokens.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while Instant::now() < deadline && sent.fetch_add(1, Ordering::SeqCst) < max_requests {
                let body = serde_json::json!({
                    "inputs": prompts[i % prompts.len()],
                    "parameters": {"max_new_tokens": max_new, "details": true, "ignore_eos": true}
                });
                i += clients;
                let t = Instant::now();
                let r = http
                    .post(format!("{url}/generate"))
                    .json(&body)
                    .send()
                    .await;
                let outcome = match r {
                    Ok(r) if r.status().is_success() => match r.json::<serde_json::Value>().await {
                        Ok(v) => {
                            Ok(v["details"]["generated_tokens"].as_u64().unwrap_or(0) as usize)
                        }
                        Err(e) => Err(format!("body: {e}")),
                    },
                    Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
                    Err(e) => Err(format!("transport: {e}")),
                };
                match outcome {
                    Ok(n) => {
                        tokens.fetch_add(n, Ordering::SeqCst);
                        latencies
                            .lock()
                            .unwrap()
                            .push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    Err(e) => *errors.lock().unwrap().entry(e).or_default() += 1,
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall = started.elapsed().as_secs_f64();
    let mut ms = latencies.lock().unwrap().clone();
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| {
        if ms.is_empty() {
            f64::NAN
        } else {
            ms[((ms.len() - 1) as f64 * p).round() as usize]
        }
    };
    let errors = errors.lock().unwrap().clone();
    println!(
        "{}",
        serde_json::json!({
            "clients": clients,
            "seconds": (wall * 10.0).round() / 10.0,
            "requests": ms.len(),
            "errors": errors.values().sum::<usize>(),
            "error_kinds": errors,
            "requests_per_s": ms.len() as f64 / wall,
            "tokens_per_s": tokens.load(Ordering::SeqCst) as f64 / wall,
            "latency_ms_p50": q(0.5),
            "latency_ms_p95": q(0.95),
            "latency_ms_p99": q(0.99),
        })
    );
}
