//! Training throughput of the encoder-decoder at fixed shapes, for bench/train.sh: the same
//! shapes as ../shared/bench/torch_seq2seq_baseline.py (batch 32, source 128, target 128,
//! vocab 8000), random tokens, the stage's own model, loss and optimiser.
//!
//!     cargo run --release -p orchestrate-model --example train_bench -- mini 3
//!
//! Prints one JSON line.

use burn::backend::{Autodiff, Flex};
use burn::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use orchestrate_model::model::{masked_cross_entropy, ModelConfig};

type Train = Autodiff<Flex>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map(String::as_str).unwrap_or("mini");
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let (d, h, layers, ff) = match preset {
        "spec512" => (512, 8, 6, 2048),
        _ => (256, 8, 4, 1024),
    };
    let (batch, src_len, tgt_len, vocab) = (32, 128, 128, 8000);
    let cfg = ModelConfig {
        vocab_size: vocab,
        d_model: d,
        n_heads: h,
        enc_layers: layers,
        dec_layers: layers,
        d_ff: ff,
        max_len: 512,
        dropout: 0.1,
    };
    let device = Default::default();
    <Train as Backend>::seed(&device, 0);
    let mut model = cfg.init::<Train>(&device);
    let mut optim = AdamWConfig::new()
        .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
        .init();
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
    let src = Tensor::<Train, 2, Int>::from_data(
        TensorData::new(tokens(batch * src_len), [batch, src_len]),
        &device,
    );
    let tgt_in = Tensor::<Train, 2, Int>::from_data(
        TensorData::new(tokens(batch * tgt_len), [batch, tgt_len]),
        &device,
    );
    let tgt_out = Tensor::<Train, 2, Int>::from_data(
        TensorData::new(tokens(batch * tgt_len), [batch, tgt_len]),
        &device,
    );
    let no_pad_src = Tensor::<Train, 2, Bool>::from_data(
        TensorData::new(vec![false; batch * src_len], [batch, src_len]),
        &device,
    );
    let no_pad_tgt = Tensor::<Train, 2, Bool>::from_data(
        TensorData::new(vec![false; batch * tgt_len], [batch, tgt_len]),
        &device,
    );
    let mut step = || {
        let memory = model.encode(src.clone(), no_pad_src.clone());
        let logits = model.decode(
            tgt_in.clone(),
            no_pad_tgt.clone(),
            memory,
            no_pad_src.clone(),
        );
        let loss = masked_cross_entropy(
            logits,
            tgt_out.clone(),
            no_pad_tgt.clone(),
            batch * tgt_len,
            0.0,
        );
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-4, model.clone(), grads);
        loss.into_scalar().elem::<f32>()
    };
    step(); // warm-up
    let t = std::time::Instant::now();
    for _ in 0..steps {
        step();
    }
    let dt = t.elapsed().as_secs_f64() / steps as f64;
    let toks = batch * (src_len + tgt_len);
    println!(
        "{{\"kind\": \"train\", \"engine\": \"burn-flex\", \"model\": \"{preset}\", \"params\": {}, \"batch\": {batch}, \"src\": {src_len}, \"tgt\": {tgt_len}, \"step_ms\": {:.1}, \"tokens_per_s\": {:.0}, \"threads\": {}}}",
        cfg.parameters(),
        dt * 1e3,
        toks as f64 / dt,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
}
