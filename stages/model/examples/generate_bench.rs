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
        let mut ms: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
        (q(0.5), q(0.95))
    };
    let report = |mode: &str, batch: usize, (p50, p95): (f64, f64)| {
        println!(
            "{{\"kind\": \"generate\", \"engine\": \"burn-flex\", \"mode\": \"{mode}\", \"batch\": {batch}, \"prompt\": {prompt}, \"new_tokens\": {new}, \"latency_ms_p50\": {p50:.2}, \"latency_ms_p95\": {p95:.2}, \"tokens_per_s\": {:.0}}}",
            batch as f64 * new as f64 / (p50 / 1e3)
        );
    };
    report(
        "kv_cache",
        1,
        time(&|| {
            generate(&model, &specials, &[row(0)], &device, |_, _| Next::Continue);
        }),
    );
    report(
        "recompute_prefix",
        1,
        time(&|| {
            generate_uncached(&model, &specials, &src(0), new, &device);
        }),
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
