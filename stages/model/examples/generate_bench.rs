//! Greedy generation latency of the `mini` shape, for bench/generate.sh: 50 new tokens from
//! a 32-token prompt (the shapes of ../shared/bench/torch_seq2seq_baseline.py's generation
//! bench), with the key/value cache at batch 1 and 32, and recomputing the prefix at batch 1.
//! Random weights: latency does not depend on what the model learned (end-of-text ignored).
//!
//!     cargo run --release -p orchestrate-model --example generate_bench -- [RUNS]
//!
//! Prints one JSON line per measurement.

use std::time::Instant;

use burn::backend::Flex;
use burn::prelude::*;
use orchestrate_model::data::Specials;
use orchestrate_model::generate::{generate, generate_uncached, Next, Row, Sampling};
use orchestrate_model::model::ModelConfig;

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let cfg = ModelConfig {
        vocab_size: 8000,
        d_model: 256,
        n_heads: 8,
        enc_layers: 4,
        dec_layers: 4,
        d_ff: 1024,
        max_len: 256,
        dropout: 0.0,
        activation: orchestrate_model::model::Activation::Relu,
    };
    let device = Default::default();
    <Flex as Backend>::seed(&device, 1);
    let model = cfg.init::<Flex>(&device);
    let specials = Specials::minimal();
    let (prompt, new) = (32usize, 50usize);
    let src = |i: usize| -> Vec<u32> {
        (0..prompt)
            .map(|j| (7 + i * 31 + j * 13) as u32 % 8000)
            .collect()
    };
    let row = |i: usize| Row {
        src: src(i),
        sampling: Sampling::default(),
        max_new_tokens: new,
        ignore_eos: true,
    };
    let time = |f: &dyn Fn()| {
        f();
        f();
        let ms: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        quantiles(ms)
    };
    let report = |mode: &str, batch: usize, (p50, p95): (f64, f64)| {
        println!(
            "{{\"kind\": \"generate\", \"engine\": \"burn-flex\", \"mode\": \"{mode}\", \"batch\": {batch}, \"prompt\": {prompt}, \"new_tokens\": {new}, \"latency_ms_p50\": {p50:.2}, \"latency_ms_p95\": {p95:.2}, \"tokens_per_s\": {:.0}}}",
            batch as f64 * new as f64 / (p50 / 1e3)
        );
    };
    // Cached and recomputing runs alternate, one pair at a time, so a slow spell of a shared
    // machine lands on both: the ratio is the median of the pairs' ratios.
    let once = |f: &dyn Fn()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64() * 1e3
    };
    let cached = || {
        generate(&model, &specials, &[row(0)], &device, |_, _| Next::Continue);
    };
    let uncached = || {
        generate_uncached(&model, &specials, &src(0), new, &device);
    };
    cached();
    uncached();
    let (mut kv, mut rc, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (a, b) = (once(&cached), once(&uncached));
        kv.push(a);
        rc.push(b);
        ratio.push(b / a);
    }
    report("kv_cache", 1, quantiles(kv));
    report("recompute_prefix", 1, quantiles(rc));
    println!(
        "{{\"kind\": \"cache_speedup\", \"batch\": 1, \"pairs\": {runs}, \"ratio_p50\": {:.2}, \"ratio_min\": {:.2}}}",
        quantiles(ratio.clone()).0,
        ratio.iter().copied().fold(f64::INFINITY, f64::min)
    );
    let rows: Vec<Row> = (0..32).map(row).collect();
    report(
        "kv_cache",
        32,
        time(&|| {
            generate(&model, &specials, &rows, &device, |_, _| Next::Continue);
        }),
    );
}

/// p50 and p95 of a sample.
fn quantiles(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    (q(0.5), q(0.95))
}
