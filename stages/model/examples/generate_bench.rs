//! Greedy generation latency of the `mini` shape, for bench/generate.sh: 50 new tokens from
//! a 32-token prompt (the shapes of ../shared/bench/torch_seq2seq_baseline.py's generation
//! bench), with the key/value cache at batch 1 and 32, and recomputing the prefix at batch 1.
//! Random weights: latency does not depend on what the model learned (end-of-text ignored).
//!
//!     cargo run --release -p orchestrate-model --example generate_bench -- [RUNS]
//!     cargo run --release -p orchestrate-model --features cuda --example generate_bench -- \
//!         20 --device cuda
//!
//! Prints one JSON line per measurement.

use std::time::Instant;

use burn::prelude::*;
use orchestrate_model::compute::{self, Compute, OnDevice};
use orchestrate_model::data::Specials;
use orchestrate_model::generate::{generate, generate_uncached, Next, Row, Sampling};
use orchestrate_model::model::ModelConfig;

struct Bench {
    runs: usize,
    engine: String,
}

/// The allocator `orchestrate serve` runs with.
#[global_allocator]
static ALLOC: orchestrate_alloc::Global = orchestrate_alloc::Global;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs = args.first().and_then(|s| s.parse().ok()).unwrap_or(20);
    let device = args
        .iter()
        .position(|a| a == "--device")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or("cpu");
    let compute = Compute::parse(device).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let engine = if compute.is_cuda() {
        "burn-cuda"
    } else {
        "burn-flex"
    }
    .to_string();
    if let Err(e) = compute::run_on(compute, Bench { runs, engine }) {
        eprintln!("{e}");
        std::process::exit(1);
    }
}

impl OnDevice for Bench {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) {
        bench::<B>(self.runs, &self.engine, &device)
    }
}

fn bench<B: Backend>(runs: usize, engine: &str, device: &B::Device) {
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
    let model = cfg.init_seeded::<B>(1, device);
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
            "{{\"kind\": \"generate\", \"engine\": \"{engine}\", \"mode\": \"{mode}\", \"batch\": {batch}, \"prompt\": {prompt}, \"new_tokens\": {new}, \"latency_ms_p50\": {p50:.2}, \"latency_ms_p95\": {p95:.2}, \"tokens_per_s\": {:.0}}}",
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
        generate(&model, &specials, &[row(0)], device, |_, _| Next::Continue);
    };
    let uncached = || {
        generate_uncached(&model, &specials, &src(0), new, device);
    };
    if std::env::var_os("ONLY_CACHED").is_some() {
        // For a profiler: the cached batch-1 loop alone.
        report("kv_cache", 1, time(&cached));
        return;
    }
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
            generate(&model, &specials, &rows, device, |_, _| Next::Continue);
        }),
    );
}

/// p50 and p95 of a sample.
fn quantiles(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    (q(0.5), q(0.95))
}
