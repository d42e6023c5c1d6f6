//! The `train` stage: the encoder-decoder learns to continue a record from a prompt and its
//! language and author tokens. Checkpoints (weights, optimiser state, step) go to the
//! artifact store; everything random is a function of (seed, step), so a resumed run repeats
//! exactly what the uninterrupted one would have done.

use std::path::Path;
use std::time::Instant;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType};
use orchestrate_stage::{
    canonical_params, ArtifactKind, InputDecl, Inputs, ParamError, ParamProblem, PathSegment,
    StageContext, StageDescriptor, StageError, StageOutput,
};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::adamw::{AdamWSettings, FlatAdamW, Flatten, Grads, Scatter};
use crate::compute::{self, Compute, OnDevice};
use crate::data::{self, Batch, Example, Padding, Rounding, Specials};
use crate::end_to_end::lay_end_to_end;
use crate::model::{
    dropout_seed, key_dropout, masked_cross_entropy, seed_step, Activation, CastParams,
    ModelConfig, Seq2Seq, MAX_D_FF, MAX_D_MODEL, MAX_LAYERS, MAX_LEN,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// d_model 256, 4+4 layers, ff 1024: 9.5M parameters with an 8k vocabulary.
    Mini,
    /// The specification's 512-wide model: d_model 512, 6+6 layers, ff 2048.
    Spec512,
}

/// The number format of the forward and backward passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    /// Mixed precision: parameters and optimiser state stay f32 (the master weights); each
    /// step computes in bf16 and the loss (log-softmax over the vocabulary) in f32. On the
    /// CPU and across several GPUs each parameter is cast by autodiff (its gradient arrives
    /// in f32); on one GPU the optimiser casts them all at once and the bf16 gradients
    /// back (`FlatAdamW::cast_copy`).
    Bf16,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    #[serde(default = "default_preset")]
    pub preset: Preset,
    /// Overrides of the preset; `null` keeps the preset's value.
    #[serde(default)]
    pub d_model: Option<usize>,
    #[serde(default)]
    pub n_heads: Option<usize>,
    #[serde(default)]
    pub enc_layers: Option<usize>,
    #[serde(default)]
    pub dec_layers: Option<usize>,
    #[serde(default)]
    pub d_ff: Option<usize>,
    /// Must match the tokenizer when given; taken from it otherwise.
    #[serde(default)]
    pub vocab_size: Option<usize>,
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// `relu` (as PyTorch's `nn.Transformer`) or `gelu`.
    #[serde(default = "default_activation")]
    pub activation: Activation,
    #[serde(default = "default_steps")]
    pub steps: u64,
    #[serde(default = "default_batch")]
    pub batch: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Linear warm-up steps, then cosine decay to `lr * min_lr_ratio`.
    #[serde(default = "default_warmup")]
    pub warmup: u64,
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// AdamW's moment decay rates and denominator guard; burn's defaults (0.9, 0.999, 1e-5).
    #[serde(default = "default_beta_1")]
    pub beta_1: f64,
    #[serde(default = "default_beta_2")]
    pub beta_2: f64,
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// Gradient clipping: the global norm over every parameter's gradient is scaled down to
    /// at most this (0 turns it off). The norm is logged as `grad_norm`.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    #[serde(default)]
    pub label_smoothing: f64,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Train on at most this many records (CI-sized runs).
    #[serde(default)]
    pub max_records: Option<usize>,
    /// CPU threads for tensor work (all cores when absent). The bytes a CPU training
    /// produces do not depend on it (sums are split the same way whatever the count).
    #[serde(default)]
    pub threads: Option<usize>,
    #[serde(default = "default_precision")]
    pub precision: Precision,
    /// Activation (gradient) checkpointing: the backward pass recomputes cheap activations
    /// instead of keeping them from the forward pass (burn's balanced strategy), trading
    /// compute for memory. Results are the same.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// GPUs that train together, by CUDA ordinal (`[0, 1]`): data parallel, each takes a
    /// share of every batch and the gradients are summed on the first, which holds the
    /// optimiser. Needs `resources.device: cuda`; absent means the stage's one device.
    #[serde(default)]
    pub devices: Option<Vec<usize>>,
}

fn default_activation() -> Activation {
    Activation::Relu
}

fn default_precision() -> Precision {
    Precision::Fp32
}

fn default_preset() -> Preset {
    Preset::Mini
}
fn default_max_len() -> usize {
    256
}
fn default_dropout() -> f64 {
    0.1
}
fn default_steps() -> u64 {
    2000
}
fn default_batch() -> usize {
    32
}
fn default_lr() -> f64 {
    3e-4
}
fn default_warmup() -> u64 {
    100
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_beta_1() -> f64 {
    0.9
}
fn default_beta_2() -> f64 {
    0.999
}
fn default_epsilon() -> f64 {
    1e-5
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_checkpoint_every() -> u64 {
    200
}
fn default_eval_every() -> u64 {
    100
}
fn default_eval_batches() -> usize {
    20
}
fn default_log_every() -> u64 {
    10
}
fn default_seed() -> u64 {
    42
}

impl TrainParams {
    /// The network this stage will build, before the vocabulary is known.
    pub fn shape(&self) -> (usize, usize, usize, usize, usize) {
        let (d, h, e, de, ff) = match self.preset {
            Preset::Mini => (256, 8, 4, 4, 1024),
            Preset::Spec512 => (512, 8, 6, 6, 2048),
        };
        (
            self.d_model.unwrap_or(d),
            self.n_heads.unwrap_or(h),
            self.enc_layers.unwrap_or(e),
            self.dec_layers.unwrap_or(de),
            self.d_ff.unwrap_or(ff),
        )
    }

    /// The widths of the rows of every weight matrix this stage's model has, each named by
    /// the param that sets it: attention and the embeddings are `d_model` wide, the first
    /// feed-forward layer `d_ff` (the output projection is the embedding's).
    pub fn matrix_rows(&self) -> Vec<(&'static str, usize)> {
        let (d, _, _, _, ff) = self.shape();
        vec![("d_model", d), ("d_ff", ff)]
    }

    fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        // The peak is warmup's last step; the floor is the last step's.
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step + 1 - self.warmup) as f64 / span).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

pub const DESCRIPTOR: StageDescriptor = StageDescriptor {
    kind: "train",
    about:
        "trains the encoder-decoder on the corpus with the tokenizer; checkpoints survive a kill",
    inputs: Inputs::Typed(&[
        InputDecl {
            name: "corpus",
            kind: ArtifactKind::Corpus,
            many: false,
            required: true,
            reads: &["val"],
        },
        InputDecl {
            name: "tokenizer",
            kind: ArtifactKind::Tokenizer,
            many: false,
            required: true,
            reads: &[],
        },
    ]),
    output: ArtifactKind::Model,
    device_dependent: true,
    names_in_output: false,
    code_hash: env!("STAGE_CODE_HASH"),
    tracked_files: &["model.json", "training.json"],
    canonical_params: canonical,
    file_deps: orchestrate_stage::no_file_deps,
    empty_part: orchestrate_stage::no_empty_parts,
    // The bytes do not depend on the thread count (every CPU sum runs in an order fixed by
    // the data), nor on when checkpoints are written or the validation loss is measured
    // along the way (the last step always is, and evaluation draws nothing). `log_every`
    // is keyed: training.json's train_loss is the last logging window's.
    unkeyed: &["threads", "checkpoint_every", "eval_every"],
};

fn canonical(v: serde_json::Value) -> Result<serde_json::Value, ParamError> {
    let v = canonical_params::<TrainParams>(v)?;
    let p: TrainParams = serde_json::from_value(v.clone()).expect("just canonicalised");
    let bad = |key: &str, msg: String| ParamError {
        path: vec![PathSegment::Key(key.into())],
        problem: ParamProblem::Invalid(msg),
    };
    // Every problem at once, each at its key.
    let mut problems = Vec::new();
    // Each problem is reported at the key that holds it, so that `validate` underlines it.
    let (d, h, e, de, ff) = p.shape();
    for (key, value) in [
        ("d_model", d),
        ("n_heads", h),
        ("enc_layers", e),
        ("dec_layers", de),
        ("d_ff", ff),
        ("batch", p.batch),
        ("eval_batches", p.eval_batches),
        ("threads", p.threads.unwrap_or(1)),
        ("max_records", p.max_records.unwrap_or(1)),
    ] {
        if value == 0 {
            problems.push(bad(key, format!("{key} must be at least 1")));
        }
    }
    // Far beyond any model this stage is for, and each a size that would otherwise end in
    // an allocation failure or the OOM killer rather than a message.
    for (key, value, most) in [
        ("d_model", d, MAX_D_MODEL),
        ("d_ff", ff, MAX_D_FF),
        ("enc_layers", e, MAX_LAYERS),
        ("dec_layers", de, MAX_LAYERS),
        ("max_len", p.max_len, MAX_LEN),
        ("batch", p.batch, 65_536),
        ("threads", p.threads.unwrap_or(1), crate::MAX_THREADS),
    ] {
        if value > most {
            problems.push(bad(key, format!("{key} {value} is above {most}")));
        }
    }
    if h != 0 && d % h != 0 {
        problems.push(bad(
            "n_heads",
            format!("{h} heads do not divide d_model {d}"),
        ));
    }
    if p.max_len < 8 {
        problems.push(bad(
            "max_len",
            format!("max_len {} is too short (at least 8)", p.max_len),
        ));
    }
    for (key, v) in [
        ("steps", p.steps),
        ("checkpoint_every", p.checkpoint_every),
        ("eval_every", p.eval_every),
        ("log_every", p.log_every),
    ] {
        if v == 0 {
            problems.push(bad(key, format!("{key} must be at least 1")));
        }
    }
    // A warm-up longer than the training leaves the learning rate short of `lr` throughout
    // and the cosine decay never begins (`steps: 50` beside the default `warmup: 100`).
    if p.steps != 0 && p.warmup > p.steps {
        problems.push(bad(
            "warmup",
            format!(
                "warmup {} is longer than the training ({} steps): the learning rate would never reach lr",
                p.warmup, p.steps
            ),
        ));
    }
    // Written as "inside the range or refuse": a value that is not a number fails too.
    for (key, v, lo, hi, range) in [
        ("dropout", p.dropout, 0.0, 1.0, "[0, 1)"),
        ("label_smoothing", p.label_smoothing, 0.0, 1.0, "[0, 1)"),
    ] {
        if !(v >= lo && v < hi) {
            problems.push(bad(key, format!("{key} {v} is outside {range}")));
        }
    }
    for (key, v, range) in [
        (
            "min_lr_ratio",
            p.min_lr_ratio,
            "[0, 1]: the schedule's floor, as a share of lr",
        ),
        ("weight_decay", p.weight_decay, "[0, 1]"),
    ] {
        if !(0.0..=1.0).contains(&v) {
            problems.push(bad(key, format!("{key} {v} is outside {range}")));
        }
    }
    // Checked as the f32 the optimiser computes with: 0.99999999 rounds to 1.0 (and
    // 1 - beta^t to 0, a division by zero), 1e-46 to 0.
    for (key, v) in [("beta_1", p.beta_1), ("beta_2", p.beta_2)] {
        if !(v >= 0.0 && (v as f32) < 1.0) {
            problems.push(bad(
                key,
                format!("{key} {v} is outside [0, 1) (as the f32 AdamW computes with)"),
            ));
        }
    }
    if !((p.epsilon as f32) >= f32::MIN_POSITIVE && p.epsilon <= 1.0) {
        problems.push(bad(
            "epsilon",
            format!(
                "epsilon {} must be in (0, 1] and at least f32's smallest normal value, 1.2e-38 (the AdamW computes in f32)",
                p.epsilon
            ),
        ));
    }
    if !(p.grad_clip >= 0.0 && p.grad_clip.is_finite()) {
        problems.push(bad(
            "grad_clip",
            format!(
                "grad_clip {} must be a norm ≥ 0 (0: no clipping)",
                p.grad_clip
            ),
        ));
    }
    if let Some(devices) = &p.devices {
        let mut seen = std::collections::BTreeSet::new();
        if devices.is_empty() || !devices.iter().all(|d| seen.insert(*d)) {
            problems.push(bad(
                "devices",
                "devices must list distinct GPU ordinals, at least one".into(),
            ));
        }
        if devices.len() > p.batch {
            problems.push(bad(
                "devices",
                format!(
                    "{} devices cannot share batches of {}",
                    devices.len(),
                    p.batch
                ),
            ));
        }
    }
    if !(p.lr > 0.0 && p.lr <= 1.0) {
        problems.push(bad("lr", format!("lr {} is outside (0, 1]", p.lr)));
    }
    orchestrate_stage::param_problems(problems).map(|()| v)
}

/// Bytes each parameter holds while training: its value, its gradient and AdamW's two
/// moments, in f32.
const TRAINING_BYTES_PER_PARAMETER: u64 = 16;

/// Why a model of `params` parameters cannot train on batches of `batch` x `max_len`
/// targets over `vocab` tokens in `available` bytes of memory, if it cannot: a clear
/// refusal before any data is read, where the allocator would otherwise abort the process
/// or the kernel's OOM killer end it without a word. Counted: the parameters (value,
/// gradient, AdamW's two moments) and the largest activation, the logits with their
/// gradient, at the longest targets; the rest of the activations come on top, so passing
/// this is necessary, not sufficient.
fn memory_problem(
    params: usize,
    [batch, max_len, vocab]: [usize; 3],
    available: u64,
) -> Option<String> {
    let for_params = params as u64 * TRAINING_BYTES_PER_PARAMETER;
    let for_logits = (batch as u64)
        .saturating_mul(max_len as u64)
        .saturating_mul(vocab as u64)
        .saturating_mul(2 * 4);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if for_params > available {
        return Some(format!(
            "the model has {params} parameters: training holds {:.1} GiB for them (value, gradient and AdamW's two moments, {TRAINING_BYTES_PER_PARAMETER} bytes each) before any activation, and this machine has {:.1} GiB available; lower d_model, d_ff, the layers or the tokenizer's vocab_size",
            gib(for_params),
            gib(available)
        ));
    }
    (for_params.saturating_add(for_logits) > available).then(|| {
        format!(
            "a batch of {batch} targets of up to {max_len} tokens over a vocabulary of {vocab} makes {:.1} GiB of logits and their gradient, on top of {:.1} GiB for the parameters, and this machine has {:.1} GiB available; lower batch or max_len",
            gib(for_logits),
            gib(for_params),
            gib(available)
        )
    })
}

/// The memory this process can still use, in bytes: what the kernel says can be allocated
/// without swapping (`MemAvailable`), or less where a control group limits this process (a
/// container, a Kubernetes or Argo pod, where /proc/meminfo describes the whole host). None
/// where neither can be read.
fn available_memory() -> Option<u64> {
    let host = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let group = cgroup_headroom(
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    )
    .or_else(|| {
        cgroup_headroom(
            read("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
            read("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
        )
    });
    match (host, group) {
        (Some(h), Some(g)) => Some(h.min(g)),
        (h, g) => h.or(g),
    }
}

/// A control group's limit less its usage, from the files' texts (cgroup v2's
/// `memory.max`/`memory.current`, or v1's `limit_in_bytes`/`usage_in_bytes`); None when
/// there is no limit (`max`, or v1's huge "unlimited" value) or a file is missing.
fn cgroup_headroom(limit: Option<String>, usage: Option<String>) -> Option<u64> {
    let limit: u64 = limit?.trim().parse().ok()?;
    let usage: u64 = usage?.trim().parse().ok()?;
    // cgroup v1 spells "no limit" as a page-rounded i64::MAX.
    (limit < 1 << 60).then(|| limit.saturating_sub(usage))
}

/// Training state saved with each checkpoint, beside the weights and optimiser records.
#[derive(Default, Serialize, Deserialize)]
struct Progress {
    step: u64,
    tokens: u64,
    /// The logging window so far: the sum of each step's loss times its target tokens (as
    /// f64 bits, which JSON keeps exactly) and those tokens. `train_loss` is their ratio, the
    /// mean over every token the window trained on, not one batch's (noisy, and set by
    /// whichever length bucket that batch came from). Kept here so that a resumed run logs
    /// and stores the same value as an uninterrupted one.
    #[serde(default)]
    window_loss_bits: u64,
    #[serde(default)]
    window_tokens: u64,
}

impl Progress {
    fn add_loss(&mut self, loss: f64, tokens: u64) {
        let sum = f64::from_bits(self.window_loss_bits) + loss * tokens as f64;
        self.window_loss_bits = sum.to_bits();
        self.window_tokens += tokens;
    }

    /// The window's mean loss per token so far (NaN while it is empty).
    fn window_loss(&self) -> f64 {
        f64::from_bits(self.window_loss_bits) / self.window_tokens as f64
    }

    /// The window's mean loss per token; the window starts again.
    fn take_window_loss(&mut self) -> f64 {
        let mean = self.window_loss();
        self.window_loss_bits = 0;
        self.window_tokens = 0;
        mean
    }
}

pub fn run(ctx: &StageContext<'_>) -> Result<StageOutput, StageError> {
    let p: TrainParams = ctx.params()?;
    crate::with_threads(p.threads, || train(ctx, p))
}

fn train(ctx: &StageContext<'_>, p: TrainParams) -> Result<StageOutput, StageError> {
    // Refuse an unusable device before reading a byte of data.
    let parsed = Compute::parse(ctx.device)?;
    // The GPUs this run uses; the first holds the model and the optimiser.
    let gpus: Vec<usize> = match (&p.devices, parsed) {
        (Some(_), Compute::Cpu) => return Err(StageError::Failed(
            "with.devices lists GPUs, but the stage runs on the CPU: set resources.device: cuda"
                .into(),
        )),
        // `cuda:N` names the GPU that holds the model: a `devices` list starting elsewhere
        // would move it without a word.
        (Some(devices), Compute::Cuda(n))
            if ctx.device.contains(':') && devices.first() != Some(&n) =>
        {
            return Err(StageError::Failed(format!(
                "resources.device is {}, but with.devices starts with GPU {}: list GPU {n} first, or set resources.device: cuda",
                ctx.device,
                devices.first().map_or("none".into(), |d| d.to_string())
            )))
        }
        (Some(devices), Compute::Cuda(_)) => devices.clone(),
        (None, Compute::Cuda(n)) => vec![n],
        (None, Compute::Cpu) => Vec::new(),
    };
    for &n in &gpus {
        compute::cuda_preflight(n).map_err(StageError::Failed)?;
    }
    let compute = gpus.first().map_or(Compute::Cpu, |&n| Compute::Cuda(n));
    let corpus = ctx.input("corpus")?;
    let tok_dir = &ctx.input("tokenizer")?.dir;
    let tokenizer = Tokenizer::from_file(tok_dir.join("tokenizer.json"))
        .map_err(|e| StageError::Failed(format!("cannot load the tokenizer: {e}")))?;
    let specials = Specials::from_tokenizer(&tokenizer)?;
    let vocab = tokenizer.get_vocab_size(true);
    // The model's rows are the ids 0..vocab: a tokenizer with an id at or past its count
    // (a gap left by an edited file) would index past the embedding.
    let highest = tokenizer.get_vocab(true).into_values().max().unwrap_or(0) as usize;
    if highest >= vocab {
        return Err(StageError::Failed(format!(
            "the tokenizer has {vocab} tokens but an id of {highest}: its ids must be 0 to {}, without gaps",
            vocab.saturating_sub(1)
        )));
    }
    if let Some(v) = p.vocab_size {
        if v != vocab {
            return Err(StageError::Failed(format!(
                "with.vocab_size is {v}, but the tokenizer has {vocab} tokens: drop vocab_size or retrain the tokenizer"
            )));
        }
    }
    let (d_model, n_heads, enc_layers, dec_layers, d_ff) = p.shape();
    let cfg = ModelConfig {
        vocab_size: vocab,
        d_model,
        n_heads,
        enc_layers,
        dec_layers,
        d_ff,
        max_len: p.max_len,
        dropout: p.dropout,
        activation: p.activation,
    };
    if compute == Compute::Cpu {
        let shape = [p.batch, p.max_len, vocab];
        if let Some(problem) =
            available_memory().and_then(|a| memory_problem(cfg.parameters(), shape, a))
        {
            return Err(StageError::Failed(problem));
        }
    }

    let train = data::load_examples(
        &corpus.dir,
        "train",
        &tokenizer,
        &specials,
        p.max_len,
        p.max_records,
    )?;
    let val = data::load_examples(
        &corpus.dir,
        "val",
        &tokenizer,
        &specials,
        p.max_len,
        p.max_records.map(|n| n / 10 + 1),
    )?;
    if train.is_empty() || val.is_empty() {
        return Err(StageError::Failed(format!(
            "not enough data: input `corpus` (stage `{}`) gives {} training and {} validation examples of {} tokens or more; give the empty split records (the ingest stage's `split`){}",
            corpus.stage,
            train.len(),
            val.len(),
            data::MIN_EXAMPLE_TOKENS,
            if p.max_records.is_some() {
                ", or raise `max_records`"
            } else {
                ""
            }
        )));
    }
    let padding = Rounding::for_compute(compute).within(cfg.max_len);
    let unigram_ppl = unigram_perplexity(
        &train,
        &val,
        vocab,
        &specials,
        p.batch,
        p.eval_batches,
        padding,
    );
    let params = cfg.parameters();
    ctx.events.log(&format!(
        "{params} parameters ({d_model}d, {n_heads} heads, {enc_layers}+{dec_layers} layers, vocab {vocab}); {} train / {} val examples; unigram val perplexity {unigram_ppl:.1}",
        train.len(),
        val.len()
    ));
    ctx.events.metric("parameters", params as f64, None);
    ctx.events
        .metric("unigram_val_perplexity", unigram_ppl, None);

    ctx.events.log(&format!(
        "training on {compute} ({:?}{})",
        p.precision,
        if p.gradient_checkpointing {
            ", gradient checkpointing"
        } else {
            ""
        }
    ));
    let job = Fit {
        ctx,
        p: &p,
        cfg: &cfg,
        train: &train,
        val: &val,
        specials: &specials,
        unigram_ppl,
        padding,
    };
    let done = compute::run_on(compute, job)??;

    let out = ctx.out_dir;
    std::fs::copy(tok_dir.join("tokenizer.json"), out.join("tokenizer.json"))
        .map_err(|e| StageError::io("cannot copy the tokenizer", e))?;
    let summary = serde_json::json!({
        "preset": p.preset,
        "config": cfg,
        "parameters": params,
        "specials": specials,
        "tokenizer_digest": ctx.input("tokenizer")?.digest,
    });
    write_json(&out.join("model.json"), &summary)?;
    let training = serde_json::json!({
        "steps": done.progress.step,
        "target_tokens": done.progress.tokens,
        "train_loss": done.train_loss,
        "val_loss": done.val_loss,
        "val_perplexity": done.val_loss.exp(),
        "unigram_val_perplexity": unigram_ppl,
    });
    write_json(&out.join("training.json"), &training)?;
    let mut output = StageOutput::default();
    output.metadata.insert("parameters".into(), params.into());
    output
        .metadata
        .insert("val_perplexity".into(), done.val_loss.exp().into());
    output
        .metadata
        .insert("unigram_val_perplexity".into(), unigram_ppl.into());
    output.metadata.insert(
        "config".into(),
        serde_json::to_value(&cfg).expect("plain JSON"),
    );
    Ok(output)
}

/// The training loop's inputs, handed to whichever backend the device picks.
struct Fit<'a> {
    ctx: &'a StageContext<'a>,
    p: &'a TrainParams,
    cfg: &'a ModelConfig,
    train: &'a [Example],
    val: &'a [Example],
    specials: &'a Specials,
    unigram_ppl: f64,
    padding: Padding,
}

/// Where the loop ended; the weights are in the output directory already.
struct Done {
    progress: Progress,
    train_loss: f64,
    val_loss: f64,
}

impl OnDevice for Fit<'_> {
    type Output = Result<Done, StageError>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        if self.p.gradient_checkpointing {
            fit_on::<Autodiff<B, BalancedCheckpointing>>(self, device)
        } else {
            fit_on::<Autodiff<B>>(self, device)
        }
    }
}

/// Whether training on `B` updates its parameters with [`FlatAdamW`] (GPU backends) rather
/// than burn's AdamW (the CPU); both compute the same values (see `adamw`).
pub fn uses_flat_adamw<B: Backend>() -> bool {
    !crate::fused::on_cpu::<B>()
}

fn fit_on<A: AutodiffBackend>(job: Fit<'_>, device: A::Device) -> Result<Done, StageError> {
    // burn's own clipping is per parameter tensor; clipping is global here (clip_global).
    let settings = AdamWSettings {
        beta_1: job.p.beta_1 as f32,
        beta_2: job.p.beta_2 as f32,
        epsilon: job.p.epsilon as f32,
        weight_decay: job.p.weight_decay as f32,
    };
    if uses_flat_adamw::<A>() {
        fit(job, device, FlatAdamW::<A>::new(settings))
    } else {
        fit(job, device, settings.burn().init::<A, Seq2Seq<A>>())
    }
}

fn fit<A: AutodiffBackend, O: ClippedStep<A>>(
    job: Fit<'_>,
    device: A::Device,
    mut optim: O,
) -> Result<Done, StageError> {
    let Fit {
        ctx,
        p,
        cfg,
        train,
        val,
        specials,
        unigram_ppl,
        padding,
    } = job;
    let specials = specials.clone();
    let replicas: Vec<A::Device> = match &p.devices {
        Some(ordinals) => ordinals
            .iter()
            .map(|&n| {
                let mut id = device.to_id();
                id.index_id = n as u16;
                A::Device::from_id(id)
            })
            .collect(),
        None => vec![device.clone()],
    };
    let transfer = Transfer::between(&replicas);
    if replicas.len() > 1 {
        ctx.events.log(&format!(
            "data parallel over {} GPUs; {}",
            replicas.len(),
            transfer.describe()
        ));
    }
    let mut model: Seq2Seq<A> = cfg.init_seeded(p.seed, &device);
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    let mut progress = Progress::default();
    if let Some((step, dir)) = ctx.checkpoints.latest()? {
        // Every part is read before any is taken: a checkpoint whose files arrived whole
        // (their digests match) but do not decode is set aside as a damaged one is, and the
        // run starts from step 0 rather than fail on every rerun.
        let restored = (|| -> Result<_, String> {
            let saved: Progress = serde_json::from_slice(
                &std::fs::read(dir.join("progress.json")).map_err(|e| e.to_string())?,
            )
            .map_err(|e| format!("progress.json: {e}"))?;
            if saved.step == 0 || saved.step >= p.steps {
                return Err(format!(
                    "progress.json says step {}, not one of 1 to {} this run makes",
                    saved.step,
                    p.steps - 1
                ));
            }
            let loaded = model
                .clone()
                .load_file(dir.join("model"), &recorder, &device)
                .map_err(|e| e.to_string())?;
            // burn takes each tensor whatever its shape; one that is not the config's would
            // fail later, deep in a product, or not at all.
            crate::weights::check_shapes(&model, &loaded)?;
            let record = recorder
                .load(dir.join("optimizer"), &device)
                .map_err(|e| e.to_string())?;
            Ok((saved, loaded, record))
        })();
        match restored {
            Ok((saved, loaded, record)) => {
                progress = saved;
                model = loaded;
                optim = optim.load_record(record);
            }
            Err(e) => ctx.events.log(&format!(
                "checkpoint {step} cannot be loaded ({e}): set aside, training from step 0"
            )),
        }
    }

    let per_epoch = train.len().div_ceil(p.batch) as u64;
    let mut plan_epoch = u64::MAX;
    let mut plan = Vec::new();
    let mut window = Throughput::from(Instant::now());
    let mut last_val = f64::NAN;
    let mut logged_train = f64::NAN;
    while progress.step < p.steps {
        ctx.checkpoint()?;
        let step = progress.step;
        let epoch = step / per_epoch;
        if epoch != plan_epoch {
            plan = data::epoch_plan(train, p.batch, p.seed, epoch);
            plan_epoch = epoch;
        }
        let rows: Vec<&Example> = plan[(step % per_epoch) as usize]
            .iter()
            .map(|&i| &train[i])
            .collect();
        let step_seed = data::mix(p.seed ^ data::mix(step + 1));
        let shards = data::shards(&rows, replicas.len(), &specials, padding, |i, len| {
            1 + (data::mix(step_seed ^ i as u64) % (len as u64 - 1)) as usize
        });
        // Dropout's masks from the step's seed alone, for exact resumes.
        seed_step::<A>(&device, step_seed);
        let lr = p.lr_at(step);
        let (next, loss, grad_norm) =
            train_step(model, &mut optim, &shards, p, lr, &replicas, transfer);
        let batch_tokens: usize = shards.iter().map(|b| b.tokens).sum();
        model = next;
        let log_now = (step + 1).is_multiple_of(p.log_every) || step + 1 == p.steps;
        // Reading the loss waits for the device to finish the step, and it is read every
        // step: on an H100, waiting only on logging steps (the host running ahead of the
        // device) trained `mini` 12-32% slower in three calls of alternating runs
        // (bench/results/gpu.md, 2026-11-27). Why is not measured; a likely reason is that
        // CubeCL's device threads busy-wait on a queue that a host running ahead keeps full.
        let last_train = loss.into_scalar().elem::<f64>();
        // A diverged run stops here, not after its remaining steps with a model that an
        // evaluation would score as NaN.
        if !last_train.is_finite() {
            return Err(StageError::Failed(format!(
                "training diverged at step {}: the loss is {last_train} (lr {lr:.3e}); lower `lr`, lengthen `warmup` or keep `grad_clip` on",
                progress.step + 1
            )));
        }
        // A finite loss with NaN gradients (an overflow in the backward pass) would make NaN
        // weights: on the CPU their norm is on the host every step and is checked every
        // step; on a GPU reading it waits for the step, so it is read where the weights are
        // about to be kept (a checkpoint, the end) and on logging steps (elsewhere the next
        // step's loss, read every step, shows it). An infinite norm is as fatal: clipping
        // would scale an infinite gradient by 0 (NaN), and finite ones whose squares overflow
        // f32 (beyond 1e19: on a GPU, where the norm is summed in f32) have diverged already.
        let keeps_weights =
            (progress.step + 1).is_multiple_of(p.checkpoint_every) || progress.step + 1 == p.steps;
        let grad_norm = match grad_norm {
            GradNorm::Host(norm) => Some(norm),
            device if log_now || keeps_weights => Some(device.read()),
            GradNorm::Device(_) => None,
        };
        if let Some(norm) = grad_norm.filter(|n| !n.is_finite()) {
            return Err(StageError::Failed(format!(
                "training diverged at step {}: the loss is {last_train} but the gradients' norm is {norm} (lr {lr:.3e}); lower `lr`, lengthen `warmup` or keep `grad_clip` on",
                progress.step + 1
            )));
        }
        progress.step += 1;
        progress.tokens += batch_tokens as u64;
        progress.add_loss(last_train, batch_tokens as u64);
        window.tokens += batch_tokens as u64;
        ctx.events.progress(progress.step, Some(p.steps), "steps");
        if log_now {
            let now = Instant::now();
            logged_train = progress.take_window_loss();
            ctx.events
                .metric("train_loss", logged_train, Some(progress.step));
            ctx.events.metric("lr", lr, Some(progress.step));
            if let Some(norm) = grad_norm {
                ctx.events.metric("grad_norm", norm, Some(progress.step));
            }
            ctx.events.metric(
                "tokens_per_second",
                window.per_second(now),
                Some(progress.step),
            );
            window = Throughput::from(now);
        }
        let other_work = Instant::now();
        if progress.step.is_multiple_of(p.eval_every) || progress.step == p.steps {
            last_val = evaluate(
                &model.valid(),
                val,
                &specials,
                p.batch,
                p.eval_batches,
                padding,
                &device,
            );
            ctx.events.metric("val_loss", last_val, Some(progress.step));
            ctx.events
                .metric("val_perplexity", last_val.exp(), Some(progress.step));
            // The loss since the last log; the last logged one when that was this step.
            let train_loss = if progress.window_tokens > 0 {
                progress.window_loss()
            } else {
                logged_train
            };
            ctx.events.log(&format!(
                "step {}: train loss {train_loss:.3}, val loss {last_val:.3} (perplexity {:.1}; unigram {unigram_ppl:.1})",
                progress.step,
                last_val.exp()
            ));
        }
        if progress.step.is_multiple_of(p.checkpoint_every) && progress.step < p.steps {
            save_checkpoint(ctx, &model, &optim, &progress, &recorder)?;
        }
        window.skip(other_work, Instant::now());
    }

    // (The last step is always evaluated.) A model that scores NaN is not a Model.
    if !last_val.is_finite() {
        return Err(StageError::Failed(format!(
            "training ended with a validation loss of {last_val}: the model is not usable; lower `lr` or lengthen `warmup`"
        )));
    }
    model
        .valid()
        .save_file(ctx.out_dir.join("model"), &recorder)
        .map_err(|e| StageError::Failed(format!("cannot save the model: {e}")))?;
    Ok(Done {
        progress,
        train_loss: logged_train,
        val_loss: last_val,
    })
}

/// Training throughput over a window of steps: the tokens they trained on, over the time
/// since the window began less the time spent meanwhile on validation and checkpoints,
/// which are not training.
struct Throughput {
    since: Instant,
    tokens: u64,
}

impl From<Instant> for Throughput {
    fn from(since: Instant) -> Self {
        Self { since, tokens: 0 }
    }
}

impl Throughput {
    /// Leaves the time from `from` to `to` out of the window.
    fn skip(&mut self, from: Instant, to: Instant) {
        self.since += to.saturating_duration_since(from);
    }

    fn per_second(&self, now: Instant) -> f64 {
        let secs = now.saturating_duration_since(self.since).as_secs_f64();
        self.tokens as f64 / secs.max(1e-9)
    }
}

/// One optimiser step on a batch split into `shards`, one per device in `devices` (the
/// first holds the model and the optimiser): the forward pass (in `p.precision`) and
/// backward on each device at once, the gradients summed on the first, clipping by the
/// global norm, AdamW at `lr`. Each shard's loss is divided by the whole batch's token
/// count, so the summed gradients are the whole batch's. Returns the new model, the
/// batch's loss and the gradient norm before clipping (neither read back from the device).
/// Weights, gradients and losses cross between devices as `transfer` says.
fn train_step<A: AutodiffBackend, O: ClippedStep<A>>(
    model: Seq2Seq<A>,
    optim: &mut O,
    shards: &[Batch],
    p: &TrainParams,
    lr: f64,
    devices: &[A::Device],
    transfer: Transfer,
) -> (Seq2Seq<A>, Tensor<A, 1>, GradNorm<A::InnerBackend>) {
    let main = &devices[0];
    let tokens: usize = shards.iter().map(|b| b.tokens).sum();
    let half = (p.precision == Precision::Bf16).then_some(FloatDType::BF16);
    let shard_grads = |(net, leaves): (Seq2Seq<A>, Seq2Seq<A>), shard, device| {
        let loss = batch_loss(&net, shard, tokens, p.label_smoothing, device);
        let grads = GradientsParams::from_grads(loss.backward(), &leaves);
        (grads, loss.detach())
    };
    let (grads, loss) = if shards.len() == 1 {
        // Mixed precision from the optimiser's copy where it makes one (FlatAdamW).
        shard_grads(
            step_network(&model, half, Some(&mut *optim)),
            &shards[0],
            main,
        )
    } else {
        // Each shard's thread keys its dropout masks from the step's seed too.
        let step_seed = dropout_seed();
        let parts: Vec<(GradientsParams, Tensor<A, 1>)> = std::thread::scope(|s| {
            let running: Vec<_> = shards
                .iter()
                .zip(devices)
                .enumerate()
                .map(|(i, (shard, device))| {
                    let replica = transfer.fork(&model, device);
                    let shard_grads = &shard_grads;
                    s.spawn(move || {
                        key_dropout(data::mix(step_seed ^ !(i as u64)));
                        let net = step_network::<A, O>(&replica, half, None);
                        let (grads, loss) = shard_grads(net, shard, device);
                        (
                            transfer.grads(grads, &replica, main),
                            transfer.tensor(loss, main),
                        )
                    })
                })
                .collect();
            running
                .into_iter()
                .map(|h| h.join().expect("a training shard panicked"))
                .collect()
        });
        let mut sum = GradientsAccumulator::<Seq2Seq<A>>::new();
        let mut loss = None;
        for (g, l) in parts {
            sum.accumulate(&model, g);
            loss = Some(match loss {
                None => l,
                Some(total) => total + l,
            });
        }
        (sum.grads(), loss.expect("at least one shard"))
    };
    let (model, grad_norm) = optim.clipped_step(lr, model, grads, p.grad_clip);
    (model, loss, grad_norm)
}

/// The network a step computes its loss with, and the module whose parameters its gradients
/// go to: `model` itself in f32; in `half` precision (mixed), `optim`'s copy where it offers
/// one (`ClippedStep::compute_copy`: FlatAdamW casts every parameter at once), else each
/// parameter cast by autodiff (`CastParams`), its gradient going to `model`'s.
pub fn step_network<A: AutodiffBackend, O: ClippedStep<A>>(
    model: &Seq2Seq<A>,
    half: Option<FloatDType>,
    optim: Option<&mut O>,
) -> (Seq2Seq<A>, Seq2Seq<A>) {
    let Some(dtype) = half else {
        return (model.clone(), model.clone());
    };
    match optim.and_then(|o| o.compute_copy(model, dtype)) {
        Some(copy) => (copy.clone(), copy),
        None => (model.clone().map(&mut CastParams(dtype)), model.clone()),
    }
}

/// How weights, gradients and losses cross between the devices of data-parallel training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// burn's device-to-device copy. On CUDA, burn 0.21 makes it with NCCL's send and
    /// receive (libnccl, loaded when first used: a machine without it panics there), so it
    /// is chosen only where libnccl loads.
    Direct,
    /// Read into host memory and written to the other device: two copies over the bus
    /// instead of one, but it needs no NCCL and works on every backend (burn 0.21's wgpu
    /// backend has no device-to-device copy at all). The two-device test runs this path.
    ViaHost,
}

impl Transfer {
    /// Direct between GPUs where libnccl loads, else through the host. One device moves
    /// nothing either way.
    fn between<D>(devices: &[D]) -> Self {
        if devices.len() > 1 && compute::nccl_loads() {
            Transfer::Direct
        } else {
            Transfer::ViaHost
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Transfer::Direct => "weights and gradients move between GPUs through NCCL",
            Transfer::ViaHost => {
                "weights and gradients move between GPUs through host memory (libnccl not found; install NVIDIA's NCCL, e.g. Debian's libnccl2, for direct copies)"
            }
        }
    }

    /// A replica of `model` on `device`, its parameters trainable leaves with `model`'s ids
    /// (so that its gradients can be summed with the first device's).
    fn fork<A: AutodiffBackend>(self, model: &Seq2Seq<A>, device: &A::Device) -> Seq2Seq<A> {
        let here = model.embed.weight.val().device();
        if self == Transfer::Direct || &here == device {
            return model.clone().fork(device);
        }
        // The parameters end to end, in one read and one write: tensor by tensor, the host
        // would wait on the device once per parameter (174 times for `mini`).
        let mut params = Vec::new();
        model.visit(&mut Flatten::<A>(&mut params));
        let flat = via_host(lay_end_to_end(params), device);
        model.clone().map(&mut Scatter::<A>::new(flat))
    }

    /// `grads` of `replica`'s parameters, moved to `device`.
    fn grads<A: AutodiffBackend>(
        self,
        mut grads: GradientsParams,
        replica: &Seq2Seq<A>,
        device: &A::Device,
    ) -> GradientsParams {
        if self == Transfer::Direct {
            return grads.to_device(device, replica);
        }
        if &replica.embed.weight.val().device() == device {
            return grads;
        }
        // As `fork`: all of them in one piece.
        let mut taken = TakeGrads::<A> {
            grads: &mut grads,
            flat: Vec::new(),
            ids: Vec::new(),
        };
        replica.visit(&mut taken);
        let TakeGrads { flat, ids, .. } = taken;
        if flat.is_empty() {
            return grads;
        }
        let flat = via_host(lay_end_to_end(flat), device);
        replica.visit(&mut PutGrads::<A> {
            grads: &mut grads,
            flat,
            ids,
            next: 0,
            offset: 0,
        });
        grads
    }

    fn tensor<B: Backend, const D: usize>(
        self,
        t: Tensor<B, D>,
        device: &B::Device,
    ) -> Tensor<B, D> {
        match self {
            Transfer::Direct => t.to_device(device),
            Transfer::ViaHost => via_host(t, device),
        }
    }
}

/// `t` on `device`, read into host memory and written there (unchanged where it is there).
fn via_host<B: Backend, const D: usize>(t: Tensor<B, D>, device: &B::Device) -> Tensor<B, D> {
    if &t.device() == device {
        return t;
    }
    host_copy(t, device)
}

/// A copy of `t` in a buffer of its own on `device`, through host memory, in `t`'s dtype
/// (`Tensor::from_data` given the device alone writes the default dtype, f32: a bf16
/// tensor would silently widen).
pub(crate) fn host_copy<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    device: &B::Device,
) -> Tensor<B, D> {
    let dtype = t.dtype();
    Tensor::from_data(t.into_data(), (device, dtype))
}

/// Takes every float parameter's gradient out of `grads`, flattened, in visiting order.
struct TakeGrads<'a, A: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    flat: Vec<Tensor<A::InnerBackend, 1>>,
    ids: Vec<burn::module::ParamId>,
}

impl<A: AutodiffBackend> ModuleVisitor<A> for TakeGrads<'_, A> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
        if let Some(g) = self.grads.remove::<A::InnerBackend, D>(param.id) {
            let n = g.shape().num_elements();
            self.flat.push(g.reshape([n]));
            self.ids.push(param.id);
        }
    }
}

/// Registers the gradients [`TakeGrads`] took, each its slice of `flat`, in the same order
/// (the same module visited again: `ids[next]` is the next parameter that had one).
struct PutGrads<'a, A: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    flat: Tensor<A::InnerBackend, 1>,
    ids: Vec<burn::module::ParamId>,
    next: usize,
    offset: usize,
}

impl<A: AutodiffBackend> ModuleVisitor<A> for PutGrads<'_, A> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
        if self.ids.get(self.next) != Some(&param.id) {
            return;
        }
        self.next += 1;
        let shape = param.val().shape();
        let n = shape.num_elements();
        let piece = self.flat.clone().slice(self.offset..self.offset + n);
        self.offset += n;
        self.grads
            .register::<A::InnerBackend, D>(param.id, piece.reshape(shape));
    }
}

/// The gradients' global norm before clipping: computed on the host (the CPU's, an f64 sum
/// in the parameters' order) or left on the device (GPUs: reading it back waits for the
/// step to finish, so training reads it on the steps it logs).
pub enum GradNorm<B: Backend> {
    Host(f64),
    Device(Tensor<B, 1>),
}

impl<B: Backend> GradNorm<B> {
    pub fn read(self) -> f64 {
        match self {
            GradNorm::Host(norm) => norm,
            GradNorm::Device(norm) => norm.into_scalar().elem::<f64>(),
        }
    }
}

/// An optimiser step after clipping the gradients by their global norm (what PyTorch's
/// `clip_grad_norm_` does: one direction for the whole update, unlike burn's clipping of
/// each tensor on its own); `max` 0 clips nothing.
pub trait ClippedStep<A: AutodiffBackend>: Optimizer<Seq2Seq<A>, A> {
    fn clipped_step(
        &mut self,
        lr: f64,
        model: Seq2Seq<A>,
        grads: GradientsParams,
        max: f64,
    ) -> (Seq2Seq<A>, GradNorm<A::InnerBackend>);

    /// A copy of `model` to compute the next step in `dtype` with, its parameters new
    /// leaves whose gradients this optimiser takes as they are; or None, where each
    /// parameter is cast by autodiff (`CastParams`) and the gradients go to `model`'s.
    fn compute_copy(&mut self, _model: &Seq2Seq<A>, _dtype: FloatDType) -> Option<Seq2Seq<A>> {
        None
    }
}

/// burn's AdamW (the CPU's): clipped on the host by [`clip_global`].
impl<A: AutodiffBackend> ClippedStep<A> for OptimizerAdaptor<AdamW, Seq2Seq<A>, A> {
    fn clipped_step(
        &mut self,
        lr: f64,
        model: Seq2Seq<A>,
        grads: GradientsParams,
        max: f64,
    ) -> (Seq2Seq<A>, GradNorm<A::InnerBackend>) {
        let (grads, norm) = clip_global(&model, grads, max);
        (self.step(lr, model, grads), GradNorm::Host(norm))
    }
}

/// GPUs': clipped on the device, over the gradients laid end to end (one sum, one scale).
impl<A: AutodiffBackend> ClippedStep<A> for FlatAdamW<A> {
    fn clipped_step(
        &mut self,
        lr: f64,
        model: Seq2Seq<A>,
        grads: GradientsParams,
        max: f64,
    ) -> (Seq2Seq<A>, GradNorm<A::InnerBackend>) {
        match self.update(lr, model, Grads::One(grads), Some(max)) {
            (model, Some(norm)) => (model, GradNorm::Device(norm)),
            (model, None) => (model, GradNorm::Host(0.0)),
        }
    }

    fn compute_copy(&mut self, model: &Seq2Seq<A>, dtype: FloatDType) -> Option<Seq2Seq<A>> {
        Some(self.cast_copy(model, dtype))
    }
}

/// Squared gradient sums per parameter (first pass), then the gradients scaled (second).
struct GradPass<'a, B: Backend> {
    grads: &'a mut GradientsParams,
    scale: Option<f64>,
    /// One sum per parameter, left on the device: reading each back would wait for the
    /// device once per parameter (174 waits per step for `mini` on a GPU).
    sums: Vec<Tensor<B, 1>>,
    /// The CPU's sums, taken on the host in an order fixed by the code (see
    /// [`rowmath::sum_of_squares`]): flex's own sum runs as many lanes as the machine's
    /// vectors have (8 with AVX2, 16 with AVX-512) and splits a large one over threads, so
    /// the norm, and a clipped step's weights, differed from machine to machine.
    host_sums: Vec<f64>,
}

impl<A: AutodiffBackend> ModuleVisitor<A> for GradPass<'_, A::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
        match self.scale {
            None => {
                if let Some(g) = self.grads.get::<A::InnerBackend, D>(param.id) {
                    match crate::fused::try_concrete::<_, burn_flex::FlexTensor, D>(g.clone()) {
                        Some(flex) => {
                            let flex = crate::fused::from_start(flex);
                            let n = flex.layout().num_elements();
                            let values = &flex.storage::<f32>()[..n];
                            self.host_sums.push(crate::rowmath::sum_of_squares(values));
                        }
                        None => self.sums.push(g.powi_scalar(2).sum()),
                    }
                }
            }
            Some(k) => {
                if let Some(g) = self.grads.remove::<A::InnerBackend, D>(param.id) {
                    self.grads.register(param.id, g.mul_scalar(k));
                }
            }
        }
    }
}

/// Clipping by the global norm (what PyTorch's `clip_grad_norm_` does): one direction for
/// the whole update, unlike clipping each tensor on its own. Returns the norm before.
fn clip_global<A: AutodiffBackend>(
    model: &Seq2Seq<A>,
    mut grads: GradientsParams,
    max: f64,
) -> (GradientsParams, f64) {
    let mut pass = GradPass {
        grads: &mut grads,
        scale: None,
        sums: Vec::new(),
        host_sums: Vec::new(),
    };
    model.visit(&mut pass);
    // One read for all the sums, added in f64 in the parameters' order.
    let sum_sq: f64 = match pass.sums.len() {
        0 => 0.0,
        _ => Tensor::cat(std::mem::take(&mut pass.sums), 0)
            .into_data()
            .iter::<f64>()
            .sum(),
    } + pass.host_sums.iter().sum::<f64>();
    let norm = sum_sq.sqrt();
    if max > 0.0 && norm > max {
        pass.scale = Some(max / (norm + 1e-6));
        model.visit(&mut pass);
    }
    (grads, norm)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), StageError> {
    std::fs::write(path, serde_json::to_vec_pretty(v).expect("plain JSON"))
        .map_err(|e| StageError::io(format!("cannot write {}", path.display()), e))
}

fn save_checkpoint<A: AutodiffBackend, O: Optimizer<Seq2Seq<A>, A>>(
    ctx: &StageContext<'_>,
    model: &Seq2Seq<A>,
    optim: &O,
    progress: &Progress,
    recorder: &NamedMpkFileRecorder<FullPrecisionSettings>,
) -> Result<(), StageError> {
    let dir = ctx
        .scratch_dir
        .join(format!("checkpoint-{}", progress.step));
    let fail = |e: &dyn std::fmt::Display| {
        StageError::Failed(format!("cannot write checkpoint {}: {e}", progress.step))
    };
    std::fs::create_dir_all(&dir).map_err(|e| fail(&e))?;
    model
        .clone()
        .save_file(dir.join("model"), recorder)
        .map_err(|e| fail(&e))?;
    recorder
        .record(optim.to_record(), dir.join("optimizer"))
        .map_err(|e| fail(&e))?;
    std::fs::write(
        dir.join("progress.json"),
        serde_json::to_vec(progress).expect("plain JSON"),
    )
    .map_err(|e| fail(&e))?;
    ctx.checkpoints.save(progress.step, &dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A batch's token ids as tensors: source, decoder input, decoder target.
pub fn tensors<B: Backend>(b: &Batch, device: &B::Device) -> [Tensor<B, 2, Int>; 3] {
    let int = |v: &Vec<i64>, len: usize| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v.clone(), [b.rows, len]), device)
    };
    [
        int(&b.src, b.src_len),
        int(&b.tgt_in, b.tgt_len),
        int(&b.tgt_out, b.tgt_len),
    ]
}

/// A batch's padding masks (true at padding): source, target.
pub fn masks<B: Backend>(b: &Batch, device: &B::Device) -> [Tensor<B, 2, Bool>; 2] {
    let m = |v: &Vec<bool>, len: usize| {
        Tensor::<B, 2, Bool>::from_data(TensorData::new(v.clone(), [b.rows, len]), device)
    };
    [m(&b.src_pad, b.src_len), m(&b.tgt_pad, b.tgt_len)]
}

/// The loss summed over `b`'s target tokens, divided by `denominator` (the token count of
/// the whole batch `b` is part of).
fn batch_loss<B: Backend>(
    model: &Seq2Seq<B>,
    b: &Batch,
    denominator: usize,
    smoothing: f64,
    device: &B::Device,
) -> Tensor<B, 1> {
    let [src, tgt_in, tgt_out] = tensors::<B>(b, device);
    let [src_pad, tgt_pad] = masks::<B>(b, device);
    let memory = model.encode(src, src_pad.clone());
    let mut logits = model.decode(tgt_in, tgt_pad.clone(), memory, src_pad);
    // Mixed precision computes the network in bf16; the log-softmax over 8k logits stays f32.
    if logits.dtype() != DType::F32 {
        logits = logits.cast(FloatDType::F32);
    }
    masked_cross_entropy(logits, tgt_out, tgt_pad, denominator, smoothing)
}

/// The batches validation scores: the first `max_batches` of `batch` examples each, every
/// example split at its middle. The model's validation loss and the unigram baseline it is
/// compared with are both taken on these, so on the same tokens.
fn val_batches<'a>(
    val: &'a [Example],
    specials: &'a Specials,
    batch: usize,
    max_batches: usize,
    padding: Padding,
) -> impl Iterator<Item = Batch> + 'a {
    val.chunks(batch).take(max_batches).map(move |chunk| {
        let rows: Vec<&Example> = chunk.iter().collect();
        data::make_batch(&rows, specials, padding, |_, len| len / 2)
    })
}

/// Mean loss per target token on the validation examples, split at their middle.
pub fn evaluate<B: Backend>(
    model: &Seq2Seq<B>,
    val: &[Example],
    specials: &Specials,
    batch: usize,
    max_batches: usize,
    padding: Padding,
    device: &B::Device,
) -> f64 {
    let mut total = 0.0;
    let mut tokens = 0usize;
    for b in val_batches(val, specials, batch, max_batches, padding) {
        let loss = batch_loss(model, &b, b.tokens, 0.0, device)
            .into_scalar()
            .elem::<f64>();
        total += loss * b.tokens as f64;
        tokens += b.tokens;
    }
    total / tokens.max(1) as f64
}

/// The perplexity a model that knows only token frequencies (counted on `train`, as its
/// targets are: `eos` after each record that was not cut) would have on the validation
/// targets [`evaluate`] scores: the bar a trained model must clear by far.
fn unigram_perplexity(
    train: &[Example],
    val: &[Example],
    vocab: usize,
    specials: &Specials,
    batch: usize,
    max_batches: usize,
    padding: Padding,
) -> f64 {
    let mut counts = vec![1.0f64; vocab];
    for e in train {
        for &t in &e.ids {
            counts[t as usize] += 1.0;
        }
        if !e.truncated {
            counts[specials.eos as usize] += 1.0;
        }
    }
    let total: f64 = counts.iter().sum();
    let mut nll = 0.0;
    let mut n = 0usize;
    for b in val_batches(val, specials, batch, max_batches, padding) {
        for (&t, &pad) in b.tgt_out.iter().zip(&b.tgt_pad) {
            if !pad {
                nll -= (counts[t as usize] / total).ln();
                n += 1;
            }
        }
    }
    (nll / n.max(1) as f64).exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Trainable;

    #[test]
    fn presets_and_parameter_counts() {
        let p: TrainParams =
            serde_json::from_value(canonical(serde_json::json!({})).unwrap()).unwrap();
        assert_eq!(p.shape(), (256, 8, 4, 4, 1024));
        let cfg = ModelConfig {
            vocab_size: 8000,
            d_model: 256,
            n_heads: 8,
            enc_layers: 4,
            dec_layers: 4,
            d_ff: 1024,
            max_len: 256,
            dropout: 0.1,
            activation: Activation::Relu,
        };
        let n = cfg.parameters();
        assert!((8_000_000..10_000_000).contains(&n), "{n}");
    }

    fn tiny_config(p: &TrainParams) -> ModelConfig {
        ModelConfig {
            vocab_size: 48,
            d_model: 32,
            n_heads: 4,
            enc_layers: 2,
            dec_layers: 2,
            d_ff: 64,
            max_len: 32,
            dropout: p.dropout,
            activation: p.activation,
        }
    }

    /// A tiny model on the CPU backend, built once per test so that every run compared
    /// starts from the same weights (the backend's generator is global: tests running at
    /// the same time draw from it too).
    fn tiny(p: &TrainParams) -> Seq2Seq<burn::backend::Flex> {
        tiny_config(p).init(&Default::default())
    }

    /// Losses of `n` steps on one repeated batch, from `start`'s weights, under `A`,
    /// the batch cut into `shards` (each on a replica of the model), with burn's AdamW.
    fn losses<A: AutodiffBackend<InnerBackend = burn::backend::Flex>>(
        start: &Seq2Seq<burn::backend::Flex>,
        p: &TrainParams,
        n: usize,
        shards: usize,
    ) -> Vec<f32> {
        let model = Seq2Seq::<A>::from_inner(start.clone());
        let optim = burn::optim::AdamWConfig::new().init::<A, Seq2Seq<A>>();
        let devices = vec![Default::default(); shards];
        // On one device neither transfer moves anything (the path through host memory
        // between two devices is tested on wgpu, below).
        steps(
            model,
            optim,
            p,
            n,
            &devices,
            Rounding::Multiple16,
            Transfer::ViaHost,
        )
    }

    /// `n` training examples of 12 ids each, for the tiny models' vocabulary.
    fn examples(n: u32) -> Vec<Example> {
        (0..n)
            .map(|i| Example {
                control: [4, 5],
                ids: (0..12).map(|j| 6 + (i * 7 + j * 3) % 40).collect(),
                truncated: false,
            })
            .collect()
    }

    /// Losses of `n` steps of `optim` on one repeated batch, cut into one shard per device,
    /// padded as `rounding` pads, moved between devices as `transfer` says.
    fn steps<A: AutodiffBackend, O: ClippedStep<A>>(
        model: Seq2Seq<A>,
        mut optim: O,
        p: &TrainParams,
        n: usize,
        devices: &[A::Device],
        rounding: Rounding,
        transfer: Transfer,
    ) -> Vec<f32> {
        let mut model = model.map(&mut Trainable);
        let specials = Specials::minimal();
        let examples = examples(8);
        let rows: Vec<&Example> = examples.iter().collect();
        let padding = rounding.within(32);
        let batch = data::shards(&rows, devices.len(), &specials, padding, |_, len| len / 2);
        (0..n)
            .map(|_| {
                let (next, loss, _) = train_step(
                    model.clone(),
                    &mut optim,
                    &batch,
                    p,
                    3e-3,
                    devices,
                    transfer,
                );
                model = next;
                loss.into_scalar().elem::<f32>()
            })
            .collect()
    }

    #[test]
    fn clipping_on_the_device_scales_like_clipping_on_the_host() {
        use burn::backend::{Autodiff, Flex};
        type A = Autodiff<Flex>;
        type I = Flex;
        // One batch's gradients, clipped to a norm they exceed: on the host by
        // `clip_global`, on the device by FlatAdamW, whose first moment after one step is
        // (1 - beta_1) times the gradients it used, laid end to end.
        let max = 0.05;
        let p = params(serde_json::json!({"dropout": 0.0, "grad_clip": max}));
        let model = Seq2Seq::<A>::from_inner(tiny(&p)).map(&mut Trainable);
        let examples = examples(4);
        let rows: Vec<&Example> = examples.iter().collect();
        let padding = Rounding::Multiple16.within(32);
        let batch = data::make_batch(&rows, &Specials::minimal(), padding, |_, len| len / 2);
        let grads = || {
            let loss = batch_loss(&model, &batch, batch.tokens, 0.0, &Default::default());
            GradientsParams::from_grads(loss.backward(), &model)
        };
        let (mut clipped, host_norm) = clip_global(&model, grads(), max);
        assert!(host_norm > 10.0 * max, "nothing to clip: norm {host_norm}");

        let settings = AdamWSettings::with_weight_decay(1e-4);
        let mut flat = FlatAdamW::<A>::new(settings);
        let (_, norm) = flat.clipped_step(1e-3, model.clone(), grads(), max);
        let norm = norm.read();
        assert!(
            (norm - host_norm).abs() < 1e-5 * host_norm,
            "{norm} vs {host_norm}"
        );

        // The host's clipped gradients in the model's order, as FlatAdamW lays them out.
        struct Flatten<'a>(&'a mut GradientsParams, Vec<f32>);
        impl ModuleVisitor<A> for Flatten<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
                let g = self
                    .0
                    .remove::<I, D>(param.id)
                    .expect("every parameter has one");
                self.1.extend(g.into_data().iter::<f32>());
            }
        }
        let mut host = Flatten(&mut clipped, Vec::new());
        model.visit(&mut host);
        // The host's norm is the gradients' own, summed in f64 (the clipped ones are the
        // gradients times one scale).
        let clipped_norm: f64 = host
            .1
            .iter()
            .map(|&g| f64::from(g).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            (clipped_norm - max).abs() < 1e-6 * max,
            "{clipped_norm} vs {max}"
        );
        let (m, _, _) = flat.to_record().expect("moments after a step");
        let m: Vec<f32> = m.into_data().iter::<f32>().collect();
        assert_eq!(m.len(), host.1.len());
        let scale = (1.0 - settings.beta_1) as f64;
        let worst = m
            .iter()
            .zip(&host.1)
            .map(|(&m, &g)| (m as f64 - scale * g as f64).abs())
            .fold(0.0, f64::max);
        let largest = host.1.iter().map(|g| g.abs()).fold(0.0, f32::max) as f64;
        assert!(worst < 1e-5 * scale * largest, "moments off by {worst}");
    }

    /// 4 steps' losses of the tiny model from the same weights: on the CPU (burn's AdamW,
    /// the whole batch on one device), and on wgpu over `devices` (FlatAdamW, one shard per
    /// device, through host memory).
    #[cfg(feature = "wgpu")]
    fn cpu_and_wgpu_losses(
        p: &TrainParams,
        devices: &[burn::backend::wgpu::WgpuDevice],
    ) -> (Vec<f32>, Vec<f32>) {
        use burn::backend::wgpu::Wgpu;
        use burn::backend::{Autodiff, Flex};
        type A = Autodiff<Wgpu>;
        let start = tiny(p);
        let cpu = losses::<Autodiff<Flex>>(&start, p, 4, 1);
        let copy = crate::weights::import(
            tiny_config(p).init::<Wgpu>(&devices[0]),
            &crate::weights::export(&start),
        )
        .expect("the same shapes");
        // `losses` runs burn's AdamWConfig::new(): its default weight decay is 1e-4.
        let settings = AdamWSettings::with_weight_decay(1e-4);
        let gpu = steps(
            Seq2Seq::<A>::from_inner(copy),
            FlatAdamW::<A>::new(settings),
            p,
            4,
            devices,
            Rounding::PowerOfTwo,
            Transfer::ViaHost,
        );
        (cpu, gpu)
    }

    /// The path every GPU takes (burn's operations where the CPU has fused ones, the token
    /// lookup through copies, FlatAdamW, power-of-two padding) on a real CubeCL backend:
    /// burn's wgpu one, on whatever Vulkan device the machine has (in CI, Mesa's lavapipe,
    /// a Vulkan GPU in software). Its losses follow the CPU's step for step.
    #[cfg(feature = "wgpu")]
    #[test]
    fn training_on_a_cubecl_backend_follows_the_cpu() {
        use burn::backend::wgpu::{Wgpu, WgpuDevice};
        // A clipping norm the gradients exceed, so both clip (the CPU on the host, the
        // GPU path on the device).
        let p = params(serde_json::json!({"dropout": 0.0, "grad_clip": 0.05}));
        assert!(uses_flat_adamw::<Autodiff<Wgpu>>());
        let (cpu, gpu) = cpu_and_wgpu_losses(&p, &[WgpuDevice::default()]);
        for (a, b) in cpu.iter().zip(&gpu) {
            assert!((a - b).abs() < 1e-3 * a.abs(), "cpu {cpu:?} vs gpu {gpu:?}");
        }
        assert!(gpu[3] < gpu[0], "{gpu:?}");
    }

    /// Data parallelism on two CubeCL devices, what `devices: [0, 1]` does on two GPUs
    /// without NCCL: the model copied onto the second device, each device's half of the
    /// batch through forward and backward at once, the second's gradients and loss moved to
    /// the first through host memory, summed, and one FlatAdamW step there. wgpu's
    /// `DefaultDevice` and `Cpu` are two devices to CubeCL (a server, a memory pool and a
    /// queue each) even where both are lavapipe, as in CI, so every tensor crossing between
    /// them is a real transfer. (burn's own `to_device` between them panics: burn 0.21's
    /// wgpu backend has no device-to-device copy, which is how this path was found.) The
    /// losses follow one CPU's over the whole batch.
    #[cfg(feature = "wgpu")]
    #[test]
    fn data_parallel_training_on_two_cubecl_devices_follows_one_cpu() {
        use burn::backend::wgpu::WgpuDevice;
        let p = params(serde_json::json!({"dropout": 0.0, "grad_clip": 0.05}));
        let (cpu, two) = cpu_and_wgpu_losses(&p, &[WgpuDevice::DefaultDevice, WgpuDevice::Cpu]);
        for (a, b) in cpu.iter().zip(&two) {
            assert!(
                (a - b).abs() < 1e-3 * a.abs(),
                "cpu {cpu:?} vs two devices {two:?}"
            );
        }
        assert!(two[3] < two[0], "{two:?}");
    }

    /// The weights after `steps` CPU training steps with dropout from `seed`, made as `fit`
    /// makes them: the initial model drawn for the seed, each step's randomness seeded
    /// with the step's seed.
    fn trained_weights(p: &TrainParams, steps: u64) -> Vec<Vec<f32>> {
        use burn::backend::Flex;
        type A = Autodiff<Flex>;
        let device = Default::default();
        let mut model: Seq2Seq<A> = tiny_config(p).init_seeded(p.seed, &device);
        let mut optim = burn::optim::AdamWConfig::new().init::<A, Seq2Seq<A>>();
        let examples = examples(8);
        let rows: Vec<&Example> = examples.iter().collect();
        let padding = Rounding::Multiple16.within(32);
        let specials = Specials::minimal();
        let batch = data::shards(&rows, 1, &specials, padding, |_, len| len / 2);
        for step in 0..steps {
            seed_step::<A>(&device, data::mix(p.seed ^ data::mix(step + 1)));
            let devices = [device];
            model = train_step(
                model,
                &mut optim,
                &batch,
                p,
                3e-3,
                &devices,
                Transfer::ViaHost,
            )
            .0;
        }
        crate::weights::export(&model.valid())
            .into_iter()
            .map(|t| t.values)
            .collect()
    }

    #[test]
    fn training_draws_the_same_whatever_other_stages_draw_meanwhile() {
        // In f32, and in bf16 (mixed precision), whose dropout takes another path.
        for precision in ["fp32", "bf16"] {
            let p = params(serde_json::json!({"dropout": 0.3, "seed": 11, "precision": precision}));
            let alone = crate::with_threads(Some(1), || Ok(trained_weights(&p, 6))).unwrap();
            let beside = beside_other_stages(|| {
                crate::with_threads(Some(1), || Ok(trained_weights(&p, 6))).unwrap()
            });
            assert!(
                alone == beside,
                "{precision}: another stage's draws changed the trained weights"
            );
            // The seed does reach the weights (through the initial model and dropout).
            let mut reseeded = p.clone();
            reseeded.seed = 12;
            let other = crate::with_threads(Some(1), || Ok(trained_weights(&reseeded, 6))).unwrap();
            assert!(alone != other, "{precision}");
        }
    }

    /// `f`'s result, run while another thread does what other stages in the process do:
    /// trainings starting (their own seeds, their initial models) and their steps'
    /// dropout; models loaded.
    fn beside_other_stages<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        use burn::backend::Flex;
        use std::sync::atomic::{AtomicBool, Ordering};
        type A = Autodiff<Flex>;
        let stop = AtomicBool::new(false);
        let started = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                let other = params(serde_json::json!({"dropout": 0.5}));
                let cfg = tiny_config(&other);
                let device = Default::default();
                let examples = examples(4);
                let rows: Vec<&Example> = examples.iter().collect();
                let padding = Rounding::Multiple16.within(32);
                let b = data::make_batch(&rows, &Specials::minimal(), padding, |_, len| len / 2);
                let mut n = 0u64;
                started.wait();
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let model: Seq2Seq<A> = cfg.init_seeded(n, &device);
                    let _loaded: Seq2Seq<Flex> = cfg.init_zeroed(&device);
                    for step in 0..3 {
                        seed_step::<A>(&device, data::mix(n ^ step));
                        batch_loss(&model, &b, b.tokens, 0.0, &device);
                    }
                }
            });
            started.wait();
            let out = f();
            stop.store(true, Ordering::Relaxed);
            out
        })
    }

    fn params(extra: serde_json::Value) -> TrainParams {
        serde_json::from_value(canonical(extra).unwrap()).unwrap()
    }

    #[test]
    fn gradient_checkpointing_changes_memory_not_results() {
        use burn::backend::Flex;
        // Without dropout: nothing rekeys the masks between the two runs.
        let p = params(serde_json::json!({"dropout": 0.0}));
        let start = tiny(&p);
        let (plain, recomputed) = crate::with_threads(Some(1), || {
            Ok((
                losses::<Autodiff<Flex>>(&start, &p, 6, 1),
                losses::<Autodiff<Flex, BalancedCheckpointing>>(&start, &p, 6, 1),
            ))
        })
        .unwrap();
        assert!(plain[5] < plain[0], "{plain:?}");
        assert_eq!(plain, recomputed);
    }

    #[test]
    fn data_parallel_shards_sum_to_the_whole_batch() {
        use burn::backend::Flex;
        // Two replicas (here both on the CPU) each take half of every batch; without
        // dropout the steps must match one device's up to float rounding.
        let p = params(serde_json::json!({"dropout": 0.0}));
        let start = tiny(&p);
        let one = losses::<Autodiff<Flex>>(&start, &p, 5, 1);
        let two = losses::<Autodiff<Flex>>(&start, &p, 5, 2);
        for (a, b) in one.iter().zip(&two) {
            assert!((a - b).abs() < 1e-4 * a.abs(), "{one:?} vs {two:?}");
        }
        assert!(one[4] < one[0]);
    }

    #[test]
    fn bf16_through_flat_adamws_one_cast_trains_like_casting_each_parameter() {
        use burn::backend::Flex;
        type A = Autodiff<Flex>;
        // No clipping: burn's AdamW clips on the host, FlatAdamW on the device, in sums of
        // another order; unclipped, both updates are the same to the bit (see `adamw`).
        let p = params(serde_json::json!({"dropout": 0.0, "precision": "bf16", "grad_clip": 0.0}));
        let start = tiny(&p);
        // burn's AdamW (AdamWConfig's defaults) has no copy to offer: each parameter is cast.
        let each = losses::<A>(&start, &p, 4, 1);
        let once = steps(
            Seq2Seq::<A>::from_inner(start),
            FlatAdamW::<A>::new(AdamWSettings::with_weight_decay(1e-4)),
            &p,
            4,
            &[Default::default()],
            Rounding::Multiple16,
            Transfer::ViaHost,
        );
        assert_eq!(each, once);
        assert!(once[3] < once[0], "did not learn: {once:?}");
    }

    #[test]
    fn mixed_precision_bf16_learns_like_fp32() {
        use burn::backend::Flex;
        let fp32 = params(serde_json::json!({"dropout": 0.0}));
        let bf16 = params(serde_json::json!({"dropout": 0.0, "precision": "bf16"}));
        let start = tiny(&fp32);
        let fp32 = losses::<Autodiff<Flex>>(&start, &fp32, 12, 1);
        let bf16 = losses::<Autodiff<Flex>>(&start, &bf16, 12, 1);
        // Same initial weights: the first losses differ only by bf16 rounding.
        assert!(
            (bf16[0] - fp32[0]).abs() / fp32[0] < 0.02,
            "{bf16:?} vs {fp32:?}"
        );
        assert!(bf16[11] < bf16[0] * 0.9, "bf16 did not learn: {bf16:?}");
        assert!(
            (bf16[11] - fp32[11]).abs() / fp32[11] < 0.05,
            "{bf16:?} vs {fp32:?}"
        );
        assert_ne!(bf16, fp32, "bf16 computed in f32 after all");
    }

    #[test]
    fn the_longest_examples_fit_a_position_table_of_any_length() {
        use burn::backend::Flex;
        // 24 positions: not a multiple of 16 (nor a power of two); the longest example it
        // takes, cut as `load_examples` cuts them, padded as on the CPU and on a GPU.
        let cfg = ModelConfig {
            vocab_size: 48,
            d_model: 16,
            n_heads: 2,
            enc_layers: 1,
            dec_layers: 1,
            d_ff: 32,
            max_len: 24,
            dropout: 0.0,
            activation: Activation::Relu,
        };
        let model: Seq2Seq<Flex> = cfg.init(&Default::default());
        let e = Example {
            control: [4, 5],
            ids: (0..cfg.max_len as u32 - 3).map(|i| 6 + i % 40).collect(),
            truncated: false,
        };
        for rounding in [Rounding::Multiple16, Rounding::PowerOfTwo] {
            let padding = rounding.within(cfg.max_len);
            for split in [1, e.ids.len() - 1] {
                let b = data::make_batch(&[&e], &Specials::minimal(), padding, |_, _| split);
                let loss = batch_loss(&model, &b, b.tokens, 0.0, &Default::default());
                assert!(
                    loss.into_scalar().is_finite(),
                    "{rounding:?}, split {split}"
                );
            }
        }
    }

    #[test]
    fn the_unigram_baseline_scores_the_tokens_validation_scores() {
        let specials = Specials::minimal();
        let ex = |ids: Vec<u32>, truncated| Example {
            control: [4, 5],
            ids,
            truncated,
        };
        // Counted: 6, 7 twice each, 8 four times, `eos` once (the cut record has none).
        let train = [ex(vec![6, 7, 6, 7], false), ex(vec![8, 8, 8, 8], true)];
        // One batch of two is scored: targets 7 7 eos and, cut, 8 8. The third example
        // (past `eval_batches`) is not.
        let val = [
            ex(vec![6, 6, 7, 7], false),
            ex(vec![6, 6, 8, 8], true),
            ex(vec![9, 9, 9, 9], false),
        ];
        let padding = Rounding::Multiple16.within(32);
        let model_tokens: usize = val_batches(&val, &specials, 2, 1, padding)
            .map(|b| b.tokens)
            .sum();
        assert_eq!(model_tokens, 5);
        let baseline = unigram_perplexity(&train, &val, 12, &specials, 2, 1, padding);
        // Every id starts at 1: 12 + 9 counted.
        let p = |count: f64| (count / 21.0).ln();
        let expected = (-(2.0 * p(3.0) + p(2.0) + 2.0 * p(5.0)) / 5.0).exp();
        assert!(
            (baseline - expected).abs() < 1e-9 * expected,
            "{baseline} vs {expected}"
        );
    }

    #[test]
    fn throughput_leaves_out_validation_and_checkpoints() {
        use std::time::Duration;
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut window = Throughput::from(start);
        window.tokens += 1000;
        // 2 s of training, 6 s of validation and a checkpoint, 2 s more of training.
        window.skip(at(2), at(8));
        window.tokens += 1000;
        assert_eq!(window.per_second(at(10)), 500.0);
    }

    #[test]
    fn a_model_too_big_for_memory_is_refused_before_training() {
        // mini at an 8k vocabulary: about 9.5M parameters, 150 MB of training state, and
        // 0.5 GiB of logits with their gradient at batch 32 and 256 tokens.
        let mini = [32, 256, 8000];
        assert!(memory_problem(9_552_896, mini, 1 << 30).is_none());
        let e = memory_problem(2_000_000_000, mini, 8 << 30).unwrap();
        assert!(e.contains("2000000000 parameters"), "{e}");
        assert!(e.contains("29.8 GiB"), "{e}");
        assert!(e.contains("8.0 GiB available"), "{e}");
        // The parameters fit; a batch of 8192 makes 125 GiB of logits.
        let e = memory_problem(9_552_896, [8192, 256, 8000], 8 << 30).unwrap();
        assert!(
            e.contains("125.0 GiB of logits") && e.contains("lower batch"),
            "{e}"
        );
    }

    #[test]
    fn a_control_group_limit_counts_and_no_limit_does_not() {
        let text = |s: &str| Some(s.to_string());
        assert_eq!(
            cgroup_headroom(text("8589934592\n"), text("1073741824\n")),
            Some(7 << 30)
        );
        assert_eq!(cgroup_headroom(text("max\n"), text("1073741824\n")), None);
        assert_eq!(
            cgroup_headroom(text("9223372036854771712\n"), text("1\n")),
            None
        );
        assert_eq!(cgroup_headroom(None, text("1\n")), None);
        assert_eq!(cgroup_headroom(text("100"), text("200")), Some(0));
    }

    #[test]
    fn the_logged_train_loss_is_the_mean_over_the_window_tokens() {
        let mut p = Progress::default();
        p.add_loss(2.0, 100);
        p.add_loss(4.0, 300);
        assert_eq!(p.take_window_loss(), 3.5);
        // A new window starts empty, and survives a checkpoint's JSON exactly.
        p.add_loss(0.1, 7);
        let back: Progress = serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(back.window_loss_bits, (0.1f64 * 7.0).to_bits());
        assert_eq!(back.window_tokens, 7);
        // A checkpoint written before the window was kept loads as an empty window.
        let old: Progress = serde_json::from_str(r#"{"step": 20, "tokens": 640}"#).unwrap();
        assert_eq!((old.window_loss_bits, old.window_tokens), (0, 0));
    }

    #[test]
    fn heads_must_divide_d_model() {
        let e = canonical(serde_json::json!({"d_model": 100, "n_heads": 8})).unwrap_err();
        assert!(matches!(e.problem, ParamProblem::Invalid(m) if m.contains("do not divide")));
    }

    #[test]
    fn each_bad_value_is_reported_at_its_own_key() {
        for (params, key) in [
            (serde_json::json!({"batch": 0}), "batch"),
            (serde_json::json!({"d_model": 0}), "d_model"),
            (serde_json::json!({"d_ff": 0}), "d_ff"),
            (serde_json::json!({"dec_layers": 0}), "dec_layers"),
            (
                serde_json::json!({"label_smoothing": 1.0}),
                "label_smoothing",
            ),
            (serde_json::json!({"eval_batches": 0}), "eval_batches"),
            (serde_json::json!({"min_lr_ratio": -0.5}), "min_lr_ratio"),
            (serde_json::json!({"weight_decay": -0.01}), "weight_decay"),
            (serde_json::json!({"grad_clip": -1.0}), "grad_clip"),
            (serde_json::json!({"threads": 0}), "threads"),
            (serde_json::json!({"max_len": 100_000_000}), "max_len"),
            (
                serde_json::json!({"d_model": 1_000_000, "n_heads": 1}),
                "d_model",
            ),
            (serde_json::json!({"beta_1": 1.0}), "beta_1"),
            (serde_json::json!({"beta_2": -0.1}), "beta_2"),
            (serde_json::json!({"epsilon": 0.0}), "epsilon"),
            (serde_json::json!({"beta_2": 0.99999999}), "beta_2"),
            (serde_json::json!({"epsilon": 1e-46}), "epsilon"),
            (serde_json::json!({"steps": 50}), "warmup"),
        ] {
            let e = canonical(params.clone()).unwrap_err();
            assert_eq!(e.path, vec![PathSegment::Key(key.into())], "{params}: {e}");
        }
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let p: TrainParams = serde_json::from_value(
            canonical(serde_json::json!({"steps": 100, "warmup": 10, "lr": 1e-3})).unwrap(),
        )
        .unwrap();
        assert!(p.lr_at(0) < p.lr_at(9));
        assert!((p.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!(p.lr_at(50) < p.lr_at(10));
        assert!((p.lr_at(99) - 1e-4).abs() < 1e-12);
    }
}
