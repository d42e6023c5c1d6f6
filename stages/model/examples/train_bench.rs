//! Training throughput of the encoder-decoder at fixed shapes, for bench/train.sh and
//! bench/gpu.sh: the same shapes as ../shared/bench/torch_seq2seq_baseline.py (batch 32,
//! source 128, target 128, vocab 8000), random tokens, the stage's own model, loss and
//! optimiser.
//!
//!     cargo run --release -p orchestrate-model --example train_bench -- mini 3
//!     cargo run --release -p orchestrate-model --features cuda --example train_bench -- \
//!         spec512 20 --device cuda --bf16 --checkpointing
//!     cargo run --release -p orchestrate-model --features wgpu --example train_bench -- \
//!         narrow 50 --device wgpu      # the host's share of a GPU step, on any Vulkan device
//!     cargo run --release -p orchestrate-model --example train_bench -- mini 3 --system-alloc
//!                                      # glibc's allocator instead of orchestrate's
//!     train_bench mini 30 --device cuda --no-fusion
//!                                      # burn-fusion off: every operation its own kernel
//!     train_bench mini 30 --device cuda --burn-steps
//!                                      # layer norm, attention's softmax, dropout and
//!                                      # the loss composed by burn, not one step each
//!                                      # (fused::gpu)
//!     train_bench mini 30 --device cuda --burn-cat
//!                                      # FlatAdamW lays parameters and gradients end to
//!                                      # end with burn's cat (a kernel per piece), not
//!                                      # end_to_end's one kernel
//!     train_bench mini 30 --device cuda --run-ahead
//!                                      # read only the first and last losses: the host may run
//!                                      # ahead of the device (slower on an H100, see below)
//!     train_bench mini 30 --device cuda --bf16 --cast-each
//!                                      # mixed precision with each parameter cast by
//!                                      # autodiff, not all at once by FlatAdamW
//!     train_bench narrow 6 --device wgpu --f16
//!                                      # mixed precision in f16 (lavapipe has no bf16): its
//!                                      # launches, bench/launches.sh --f16
//!     train_bench narrow 20 --device wgpu --perf-ctl CTL,ACK
//!                                      # `perf record --control fifo:CTL,ACK -D -1` samples
//!                                      # the timed steps only (bench/host_steps.sh)
//!
//! Prints one JSON line: the first step's time (warm-up: on CUDA, kernel compilation and
//! autotuning), then the mean step after it.

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType};
use orchestrate_model::adamw::{AdamWSettings, FlatAdamW};
use orchestrate_model::compute::{self, Compute, OnDevice};
use orchestrate_model::model::{masked_cross_entropy, ModelConfig, Seq2Seq};
use orchestrate_model::train;

/// The allocator `orchestrate` trains with; `--system-alloc` measures glibc's instead.
#[global_allocator]
static ALLOC: orchestrate_alloc::Global = orchestrate_alloc::Global;

struct Bench {
    /// The device as the JSON line names it.
    label: String,
    preset: String,
    steps: usize,
    /// `--bf16` (`--f16`): mixed precision, f32 master weights, computing in that dtype.
    half: Option<FloatDType>,
    /// `--cast-each`: with `half`, each parameter cast by autodiff (`CastParams`) rather
    /// than all at once by the optimiser (`ClippedStep::compute_copy`).
    cast_each: bool,
    checkpointing: bool,
    /// Read only the first and the last step's loss back, so that the host may run ahead
    /// of the device in between; by default every step's is read, as training does.
    run_ahead: bool,
    /// burn-fusion on (burn's default for GPU backends); `--no-fusion` turns it off.
    fusion: bool,
    /// `--burn-steps`: burn's compositions where GPUs take `fused::gpu`'s single steps.
    burn_steps: bool,
    /// `--burn-cat`: burn's cat where GPUs take `end_to_end`'s kernel.
    burn_cat: bool,
    /// `--perf-ctl CTL,ACK`: perf's control and acknowledgement FIFOs.
    perf_ctl: Option<String>,
}

impl OnDevice for Bench {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) {
        if self.checkpointing {
            bench::<Autodiff<B, BalancedCheckpointing>>(self, device)
        } else {
            bench::<Autodiff<B>>(self, device)
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    if flag("--system-alloc") && !orchestrate_alloc::TENSOR_ALLOC.system_only() {
        eprintln!("--system-alloc: a large block was allocated before the switch");
        std::process::exit(2);
    }
    let value = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
    };
    let asked = value("--device").map(String::as_str).unwrap_or("cpu");
    let device = Compute::parse(if asked == "wgpu" { "cpu" } else { asked }).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let job = Bench {
        label: match asked {
            "wgpu" => asked.to_string(),
            _ => device.to_string(),
        },
        preset: args.first().cloned().unwrap_or_else(|| "mini".into()),
        steps: args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3),
        half: if flag("--bf16") {
            Some(FloatDType::BF16)
        } else if flag("--f16") {
            Some(FloatDType::F16)
        } else {
            None
        },
        cast_each: flag("--cast-each"),
        checkpointing: flag("--checkpointing"),
        run_ahead: flag("--run-ahead"),
        fusion: !flag("--no-fusion"),
        burn_steps: flag("--burn-steps"),
        burn_cat: flag("--burn-cat"),
        perf_ctl: value("--perf-ctl").cloned(),
    };
    orchestrate_model::model::use_burn_steps(job.burn_steps);
    orchestrate_model::end_to_end::use_burn_cat(job.burn_cat);
    if asked == "wgpu" {
        return on_wgpu(job);
    }
    let ran = match job.fusion {
        true => compute::run_on(device, job),
        false => compute::run_on_unfused(device, job),
    };
    if let Err(e) = ran {
        eprintln!("{e}");
        std::process::exit(1);
    }
}

/// `--device wgpu`: burn's wgpu backend on the machine's Vulkan device (the `wgpu`
/// feature). With the `narrow` preset on Mesa's software device (lavapipe) this is a
/// laboratory for the host's share of a GPU step: the same burn-autodiff, burn-fusion and
/// CubeCL work per operation as on CUDA, at widths where the kernels cost little.
#[cfg(feature = "wgpu")]
fn on_wgpu(job: Bench) {
    use burn::backend::wgpu::{CubeBackend, Wgpu, WgpuDevice, WgpuRuntime};
    match job.fusion {
        true => job.run::<Wgpu>(WgpuDevice::default()),
        false => job.run::<CubeBackend<WgpuRuntime, f32, i32, u32>>(WgpuDevice::default()),
    }
}

#[cfg(not(feature = "wgpu"))]
fn on_wgpu(_job: Bench) {
    eprintln!("--device wgpu needs the wgpu feature: --features wgpu");
    std::process::exit(2)
}

/// With the stage's optimiser for the backend: one AdamW over all parameters at once on
/// GPUs, burn's per tensor on the CPU (the same values either way).
fn bench<A: AutodiffBackend>(job: Bench, device: A::Device) {
    // AdamWConfig's default weight decay, 1e-4, for both.
    let settings = AdamWSettings::with_weight_decay(1e-4);
    if train::uses_flat_adamw::<A>() {
        bench_with(job, device, FlatAdamW::<A>::new(settings))
    } else {
        bench_with(job, device, settings.burn().init::<A, Seq2Seq<A>>())
    }
}

fn bench_with<A: AutodiffBackend, O: train::ClippedStep<A>>(
    job: Bench,
    device: A::Device,
    mut optim: O,
) {
    let (d, h, layers, ff) = match job.preset.as_str() {
        "spec512" => (512, 8, 6, 2048),
        "narrow" => (64, 8, 4, 256),
        _ => (256, 8, 4, 1024),
    };
    // `narrow`: `mini`'s layers and operations at widths where kernels cost next to
    // nothing, to measure what each operation costs the host.
    let (batch, src_len, tgt_len, vocab) = match job.preset.as_str() {
        "narrow" => (4, 16, 16, 512),
        _ => (32, 128, 128, 8000),
    };
    let cfg = ModelConfig {
        vocab_size: vocab,
        d_model: d,
        n_heads: h,
        enc_layers: layers,
        dec_layers: layers,
        d_ff: ff,
        max_len: 512,
        dropout: 0.1,
        activation: orchestrate_model::model::Activation::Relu,
    };
    let mut model: Seq2Seq<A> = cfg.init_seeded(0, &device);
    let mut state = 1u64;
    let mut tokens = |n: usize| -> Vec<i64> {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % vocab as u64) as i64
            })
            .collect()
    };
    let ids = |v: Vec<i64>, len: usize| {
        Tensor::<A, 2, Int>::from_data(TensorData::new(v, [batch, len]), &device)
    };
    let src = ids(tokens(batch * src_len), src_len);
    let tgt_in = ids(tokens(batch * tgt_len), tgt_len);
    let tgt_out = ids(tokens(batch * tgt_len), tgt_len);
    let no_pad = |len: usize| {
        Tensor::<A, 2, Bool>::from_data(
            TensorData::new(vec![false; batch * len], [batch, len]),
            &device,
        )
    };
    let (no_pad_src, no_pad_tgt) = (no_pad(src_len), no_pad(tgt_len));
    let mut step = || {
        // The network the loss is computed with, and the leaves its gradients go to, as
        // `train` makes them (`--cast-each`: as it does across several devices).
        let copier = (!job.cast_each).then_some(&mut optim);
        let (net, leaves) = train::step_network(&model, job.half, copier);
        let memory = net.encode(src.clone(), no_pad_src.clone());
        let mut logits = net.decode(
            tgt_in.clone(),
            no_pad_tgt.clone(),
            memory,
            no_pad_src.clone(),
        );
        if logits.dtype() != DType::F32 {
            logits = logits.cast(FloatDType::F32);
        }
        let loss = masked_cross_entropy(
            logits,
            tgt_out.clone(),
            no_pad_tgt.clone(),
            batch * tgt_len,
            0.0,
        );
        let grads = GradientsParams::from_grads(loss.backward(), &leaves);
        model = optim.step(3e-4, model.clone(), grads);
        loss
    };
    // Reading a loss waits for the device to finish its step: after every step, as
    // `train` does (on an H100 that was faster than letting the host run ahead, see
    // train.rs), or with --run-ahead after the first (its time is the warm-up) and the
    // last only, as the PyTorch reference synchronises.
    let t = std::time::Instant::now();
    step().into_scalar().elem::<f32>();
    let warmup = t.elapsed().as_secs_f64();
    let mut perf = job.perf_ctl.as_deref().map(PerfWindow::open);
    if let Some(perf) = perf.as_mut() {
        perf.command("enable");
    }
    let t = std::time::Instant::now();
    let cpu_before = process_cpu_seconds();
    let threads_before = thread_times();
    let mut last = None;
    for _ in 0..job.steps {
        let loss = step();
        last = if job.run_ahead {
            Some(loss)
        } else {
            loss.into_scalar().elem::<f32>();
            None
        };
    }
    if let Some(loss) = last {
        loss.into_scalar().elem::<f32>();
    }
    let steps = job.steps.max(1) as f64;
    let dt = t.elapsed().as_secs_f64() / steps;
    if let Some(perf) = perf.as_mut() {
        perf.command("disable");
    }
    // The process's CPU time per step. Not the host's work: CubeCL's device threads
    // busy-wait on each other, so each busy thread burns about the step's wall time
    // (bench/host_steps.sh samples the work apart from the waiting, with --perf-ctl).
    let host_ms = match (cpu_before, process_cpu_seconds()) {
        (Some(a), Some(b)) => format!("{:.1}", (b - a) * 1e3 / steps),
        _ => "null".into(),
    };
    // The same by thread name. CubeCL runs each device on threads of its own (`DSU-…`,
    // `DSD-…`) that busy-wait on each other, so a thread's time is work and waiting; on
    // lavapipe `DSD` also runs the kernels. And the time each thread was ready to run but
    // waited for a core: more busy threads than cores (this project's 2-core VM) shows
    // there, not in the CPU time.
    let threads_after = thread_times();
    let by_thread = per_step_by_thread(&threads_before, &threads_after, steps, |t| t.cpu);
    let runqueue_by_thread =
        per_step_by_thread(&threads_before, &threads_after, steps, |t| t.runqueue);
    let toks = batch * (src_len + tgt_len);
    let how = if job.cast_each { "-cast-each" } else { "" };
    let precision = match job.half {
        None => "fp32".to_string(),
        Some(FloatDType::BF16) => format!("bf16{how}"),
        Some(_) => format!("f16{how}"),
    };
    // Model FLOPs per step: 6 per parameter per token (forward 2, backward 4) for the
    // weight matmuls, plus attention's score and value products.
    let params = cfg.parameters() as f64;
    let attn = 6.0
        * 2.0
        * batch as f64
        * (d as f64)
        * (layers as f64 * (src_len * src_len + tgt_len * tgt_len + tgt_len * src_len) as f64);
    let flops = 6.0 * params * toks as f64 + attn;
    println!(
        "{{\"kind\": \"train\", \"engine\": \"burn\", \"device\": \"{}\", \"model\": \"{}\", \"precision\": \"{}\", \"checkpointing\": {}, \"run_ahead\": {}, \"fusion\": {}, \"burn_steps\": {}, \"burn_cat\": {}, \"params\": {}, \"batch\": {batch}, \"src\": {src_len}, \"tgt\": {tgt_len}, \"warmup_s\": {warmup:.2}, \"step_ms\": {:.1}, \"tokens_per_s\": {:.0}, \"model_tflops_per_s\": {:.3}, \"host_cpu_ms_per_step\": {host_ms}, \"cpu_ms_per_step_by_thread\": {by_thread}, \"runqueue_ms_per_step_by_thread\": {runqueue_by_thread}, \"threads\": {}, \"allocator\": \"{}\", \"blocks_mapped\": {}, \"bytes_cached\": {}}}",
        job.label,
        job.preset,
        precision,
        job.checkpointing,
        job.run_ahead,
        job.fusion,
        job.burn_steps,
        job.burn_cat,
        cfg.parameters(),
        dt * 1e3,
        toks as f64 / dt,
        flops / dt / 1e12,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        if orchestrate_alloc::TENSOR_ALLOC.is_system_only() { "system" } else { "orchestrate" },
        orchestrate_alloc::TENSOR_ALLOC.mapped_blocks(),
        orchestrate_alloc::TENSOR_ALLOC.cached_bytes()
    );
}

/// `perf record --control fifo:CTL,ACK` started with its events off (`-D -1`): turned on
/// for the timed steps only, so that a profile holds neither the warm-up (kernel
/// compilation, autotuning) nor the set-up, and its samples divide by the steps.
struct PerfWindow {
    ctl: std::fs::File,
    ack: std::io::BufReader<std::fs::File>,
}

impl PerfWindow {
    fn open(fifos: &str) -> Self {
        let fail = |what: &str, e: std::io::Error| -> ! {
            eprintln!("--perf-ctl {fifos}: {what}: {e}");
            std::process::exit(2)
        };
        let Some((ctl, ack)) = fifos.split_once(',') else {
            eprintln!("--perf-ctl takes two FIFOs, CTL,ACK (perf's --control fifo:CTL,ACK)");
            std::process::exit(2)
        };
        let ctl = std::fs::OpenOptions::new()
            .write(true)
            .open(ctl)
            .unwrap_or_else(|e| fail(ctl, e));
        let ack = std::fs::File::open(ack).unwrap_or_else(|e| fail(ack, e));
        PerfWindow {
            ctl,
            ack: std::io::BufReader::new(ack),
        }
    }

    /// Sends `enable` or `disable` and waits for perf to acknowledge it: the events are on
    /// (or off) when this returns.
    fn command(&mut self, what: &str) {
        use std::io::{BufRead, Write};
        let sent = writeln!(self.ctl, "{what}");
        let mut reply = String::new();
        let acked = sent.and_then(|_| self.ack.read_line(&mut reply));
        if let Err(e) = acked {
            eprintln!("--perf-ctl: perf did not take `{what}`: {e}");
            std::process::exit(2)
        }
    }
}

/// A thread's times so far, in seconds.
#[derive(Clone, Copy, Default)]
struct ThreadTimes {
    /// User plus system CPU time (its /proc stat).
    cpu: f64,
    /// Time runnable but waiting for a core (the second field of its /proc schedstat, in
    /// nanoseconds there).
    runqueue: f64,
}

/// The times of each live thread of this process so far, summed by thread name (Linux's
/// /proc; None elsewhere). Threads that ended are not counted.
fn thread_times() -> Option<std::collections::BTreeMap<String, ThreadTimes>> {
    let mut by_name = std::collections::BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let path = task.path();
        let read = |file: &str| std::fs::read_to_string(path.join(file)).ok();
        let Some(cpu) = read("stat").and_then(|stat| cpu_seconds(&stat)) else {
            continue;
        };
        let runqueue = read("schedstat")
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0.0, |ns| ns / 1e9);
        let name = read("comm").unwrap_or_default();
        // Numbered pools (llvmpipe-0, llvmpipe-1, ...) count as one.
        let name = name.trim().trim_end_matches(|c: char| c.is_ascii_digit());
        let sum: &mut ThreadTimes = by_name.entry(name.to_string()).or_default();
        sum.cpu += cpu;
        sum.runqueue += runqueue;
    }
    Some(by_name)
}

/// Milliseconds per step by thread name of one of the [`ThreadTimes`] between two readings
/// of [`thread_times`], as a JSON object, largest first ("null" where /proc could not be
/// read).
fn per_step_by_thread(
    before: &Option<std::collections::BTreeMap<String, ThreadTimes>>,
    after: &Option<std::collections::BTreeMap<String, ThreadTimes>>,
    steps: f64,
    field: fn(&ThreadTimes) -> f64,
) -> String {
    let Some(after) = after else {
        return "null".into();
    };
    let mut per: Vec<(&String, f64)> = after
        .iter()
        .map(|(name, t)| {
            let before = before.as_ref().and_then(|b| b.get(name)).map_or(0.0, field);
            (name, (field(t) - before) * 1e3 / steps)
        })
        .filter(|(_, ms)| *ms >= 0.05)
        .collect();
    per.sort_by(|a, b| b.1.total_cmp(&a.1));
    let fields: Vec<String> = per
        .iter()
        .map(|(name, ms)| format!("\"{}\": {ms:.1}", name.replace(['"', '\\'], "_")))
        .collect();
    format!("{{{}}}", fields.join(", "))
}

/// utime + stime of a /proc stat line, in seconds.
fn cpu_seconds(stat: &str) -> Option<f64> {
    // Fields after the command name (which may hold spaces) in parentheses; utime and
    // stime are the 14th and 15th fields, in clock ticks (100 per second on Linux).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// User plus system CPU time of this process so far (Linux's /proc; None elsewhere).
fn process_cpu_seconds() -> Option<f64> {
    cpu_seconds(&std::fs::read_to_string("/proc/self/stat").ok()?)
}
