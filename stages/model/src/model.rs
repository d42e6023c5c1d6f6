//! The encoder-decoder. Pre-norm transformer layers (burn's modules, this crate's forward
//! pass), learned positions, one token
//! embedding shared by encoder, decoder and the output projection (weight tying: it is what
//! brings the `mini` preset near the specification's 8M parameters).

use std::cell::Cell;
use std::sync::{Mutex, MutexGuard, PoisonError};

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::attention::MultiHeadAttention;
use burn::nn::transformer::{
    PositionWiseFeedForward, TransformerDecoder, TransformerDecoderConfig, TransformerEncoder,
    TransformerEncoderConfig,
};
use burn::nn::{
    Dropout, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear,
};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};
use serde::{Deserialize, Serialize};

pub use crate::fused::gpu::use_burn_steps;
use crate::fused::{layer_norm, on_cpu, KeepMask};

/// Everything needed to rebuild the network; stored beside the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub enc_layers: usize,
    pub dec_layers: usize,
    pub d_ff: usize,
    /// Longest source or target sequence, in tokens.
    pub max_len: usize,
    pub dropout: f64,
    /// The feed-forward layers' activation. burn keeps it out of the weights file, so it is
    /// stored here; configs written before it existed were GELU models.
    #[serde(default = "Activation::before_it_was_stored")]
    pub activation: Activation,
}

/// The largest sizes a model may have: far beyond any `train` is for, and each a size that
/// would otherwise end in an allocation failure or the OOM killer rather than a message.
/// `train` refuses params above them; a Model artifact whose config has one is refused.
pub const MAX_D_MODEL: usize = 16_384;
pub const MAX_D_FF: usize = 65_536;
pub const MAX_LAYERS: usize = 128;
pub const MAX_LEN: usize = 65_536;
pub const MAX_VOCAB: usize = 1 << 24;

impl ModelConfig {
    /// What makes this config no network that can be built, if anything: a size of 0 or
    /// above its bound, heads that do not divide `d_model`, a dropout outside [0, 1). burn
    /// would panic on the first two kinds (a division by zero, a reshape) or abort on an
    /// allocation; a config read from an artifact is checked before it is built.
    pub fn problem(&self) -> Option<String> {
        for (name, value, most) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("d_model", self.d_model, MAX_D_MODEL),
            ("n_heads", self.n_heads, MAX_D_MODEL),
            ("enc_layers", self.enc_layers, MAX_LAYERS),
            ("dec_layers", self.dec_layers, MAX_LAYERS),
            ("d_ff", self.d_ff, MAX_D_FF),
            ("max_len", self.max_len, MAX_LEN),
        ] {
            if value == 0 || value > most {
                return Some(format!("{name} {value} is not between 1 and {most}"));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Some(format!(
                "{} heads do not divide d_model {}",
                self.n_heads, self.d_model
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Some(format!("dropout {} is not in [0, 1)", self.dropout));
        }
        None
    }
}

/// The feed-forward layers' activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// As PyTorch's `nn.Transformer` (the reference): one comparison per value.
    Relu,
    /// Exact GELU (an erf per value, forward and backward): about 10% of a CPU step.
    Gelu,
}

impl Activation {
    fn before_it_was_stored() -> Self {
        Activation::Gelu
    }

    fn config(self) -> burn::nn::activation::ActivationConfig {
        match self {
            Activation::Relu => burn::nn::activation::ActivationConfig::Relu,
            Activation::Gelu => burn::nn::activation::ActivationConfig::Gelu,
        }
    }
}

/// burn's backends draw every random value from one generator per process, which
/// `Backend::seed` replaces. Stages run on threads of one process at the same time: a seed
/// and the draws it is meant for are taken with this held, so that no other stage's seed
/// or draws land between them.
static GENERATOR: Mutex<()> = Mutex::new(());

/// Waits for the random draws queued on `device` to be made: a fused GPU backend queues
/// them and draws later, which would be after the hold on the generator ended.
fn drawn<B: Backend>(device: &B::Device) {
    // An error here would show again at the first real use of the device, with context.
    let _ = B::sync(device);
}

fn hold_generator() -> MutexGuard<'static, ()> {
    // Holds no data: a panic while it was held leaves nothing half-changed.
    GENERATOR.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ModelConfig {
    /// A model with random initial weights from burn's generator, as it stands.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Seq2Seq<B> {
        let _held = hold_generator();
        let model = self.build(device, true);
        drawn::<B>(device);
        model
    }

    /// A model with initial weights drawn for `seed` alone: the same weights whatever else
    /// the process draws meanwhile (see [`GENERATOR`]).
    pub fn init_seeded<B: Backend>(&self, seed: u64, device: &B::Device) -> Seq2Seq<B> {
        let _held = hold_generator();
        B::seed(device, seed);
        let model = self.build(device, true);
        drawn::<B>(device);
        model
    }

    /// A model with every weight zero (norms one), for weights loaded over it: it draws
    /// nothing, so loading neither waits on nor moves the generator a training draws from.
    pub fn init_zeroed<B: Backend>(&self, device: &B::Device) -> Seq2Seq<B> {
        self.build(device, false)
    }

    /// The model, its weights `random` or zero. Every parameter is made before this
    /// returns (burn makes them lazily; `StableIds` takes each), so the draws all happen
    /// within the caller's hold on the generator.
    fn build<B: Backend>(&self, device: &B::Device, random: bool) -> Seq2Seq<B> {
        let embedding = match random {
            true => Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            },
            false => Initializer::Zeros,
        };
        let mut enc =
            TransformerEncoderConfig::new(self.d_model, self.d_ff, self.n_heads, self.enc_layers)
                .with_dropout(self.dropout)
                .with_activation(self.activation.config())
                .with_norm_first(true);
        let mut dec =
            TransformerDecoderConfig::new(self.d_model, self.d_ff, self.n_heads, self.dec_layers)
                .with_dropout(self.dropout)
                .with_activation(self.activation.config())
                .with_norm_first(true);
        if !random {
            // Every linear layer of both stacks takes its stack's initializer.
            enc = enc.with_initializer(Initializer::Zeros);
            dec = dec.with_initializer(Initializer::Zeros);
        }
        let model = Seq2Seq {
            embed: EmbeddingConfig::new(self.vocab_size, self.d_model)
                .with_initializer(embedding.clone())
                .init(device),
            pos: EmbeddingConfig::new(self.max_len, self.d_model)
                .with_initializer(embedding)
                .init(device),
            encoder: enc.init(device),
            decoder: dec.init(device),
            enc_norm: LayerNormConfig::new(self.d_model).init(device),
            dec_norm: LayerNormConfig::new(self.d_model).init(device),
        };
        model.map(&mut StableIds(0))
    }

    /// Parameters, counted from the shapes (the tied output projection counted once).
    pub fn parameters(&self) -> usize {
        let d = self.d_model;
        let attn = 4 * (d * d + d);
        let ff = 2 * d * self.d_ff + self.d_ff + d;
        let norm = 2 * d;
        let enc = self.enc_layers * (attn + ff + 2 * norm);
        let dec = self.dec_layers * (2 * attn + ff + 3 * norm);
        self.vocab_size * d + self.max_len * d + enc + dec + 2 * norm
    }
}

/// burn gives each parameter a random id, and saves it with the weights: the same weights
/// would give different bytes, and so different artifact digests, run after run. Numbering
/// parameters in module order makes saved models byte-identical when their weights are.
struct StableIds(u64);

impl StableIds {
    fn next(&mut self) -> ParamId {
        self.0 += 1;
        ParamId::from(self.0)
    }
}

impl<B: Backend> ModuleMapper<B> for StableIds {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        Param::from_mapped_value(self.next(), tensor, mapper)
    }

    fn map_int<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Int>>,
    ) -> Param<Tensor<B, D, Int>> {
        let (_, tensor, mapper) = param.consume();
        Param::from_mapped_value(self.next(), tensor, mapper)
    }

    fn map_bool<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Bool>>,
    ) -> Param<Tensor<B, D, Bool>> {
        let (_, tensor, mapper) = param.consume();
        Param::from_mapped_value(self.next(), tensor, mapper)
    }
}

/// Marks every float parameter as one autodiff computes gradients for (a model brought
/// under autodiff with `from_inner` has none).
#[cfg(test)]
pub(crate) struct Trainable;

#[cfg(test)]
impl<B: burn::tensor::backend::AutodiffBackend> ModuleMapper<B> for Trainable {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = p.consume();
        Param::from_mapped_value(id, tensor.require_grad(), mapper)
    }
}

/// Casts every float parameter to a dtype, keeping its id. Under autodiff the cast is a
/// recorded operation: a loss computed with the cast copy sends its gradients back to the
/// original (f32) parameters, which is what mixed-precision training needs.
pub struct CastParams(pub FloatDType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        Param::from_mapped_value(id, tensor.cast(self.0), mapper)
    }
}

#[derive(Module, Debug)]
pub struct Seq2Seq<B: Backend> {
    pub(crate) embed: Embedding<B>,
    pub(crate) pos: Embedding<B>,
    pub(crate) encoder: TransformerEncoder<B>,
    pub(crate) decoder: TransformerDecoder<B>,
    pub(crate) enc_norm: LayerNorm<B>,
    pub(crate) dec_norm: LayerNorm<B>,
}

impl<B: Backend> Seq2Seq<B> {
    pub fn d_model(&self) -> usize {
        self.embed.weight.dims()[1]
    }

    pub fn n_heads(&self) -> usize {
        self.decoder.n_heads
    }

    /// Longest source or target the position table covers.
    pub fn max_len(&self) -> usize {
        self.pos.weight.dims()[0]
    }

    /// Embeddings of one token per row, row `r` at target position `positions[r]`.
    pub(crate) fn embed_at(&self, tokens: Tensor<B, 2, Int>, positions: &[usize]) -> Tensor<B, 3> {
        let d = self.d_model();
        let device = tokens.device();
        let at: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        let position =
            Tensor::<B, 2, Int>::from_data(TensorData::new(at, [positions.len(), 1]), &device);
        self.embed.forward(tokens) * (d as f64).sqrt() + self.pos.forward(position)
    }

    fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = tokens.dims();
        let d = self.d_model();
        let words = token_lookup(&self.embed, tokens) * (d as f64).sqrt();
        if on_cpu::<B>() {
            // Positions looked up by id, as before the GPU's way below (its CPU step was
            // not faster, and CPU results stay as they were, bit for bit).
            let positions = Tensor::<B, 1, Int>::arange(0..t as i64, &self.pos.weight.device())
                .reshape([1, t])
                .repeat_dim(0, b);
            return words + self.pos.forward(positions);
        }
        // Positions 0..t, the same in every row: the table's first rows, added by
        // broadcasting. A lookup by position ids would cost GPU training a scatter of the
        // gradient into the table (see `token_lookup` for what that costs); this costs a
        // sum over the rows.
        words + self.pos.weight.val().narrow(0, 0, t).unsqueeze::<3>()
    }

    /// `src_pad` is true at padding.
    ///
    /// The layers are burn's (their parameters, their order: pre-norm, `norm_2` before
    /// attention), the forward pass is this crate's: see [`linear`] for why.
    pub fn encode(&self, src: Tensor<B, 2, Int>, src_pad: Tensor<B, 2, Bool>) -> Tensor<B, 3> {
        let mut x = self.embed(src);
        let src_bias = pad_bias(src_pad, x.dtype());
        for layer in &self.encoder.layers {
            let h = layer_norm(&layer.norm_2, x.clone());
            let a = attention(&layer.mha, h.clone(), h, src_bias.clone());
            x = x + dropout(&layer.dropout, a);
            let h = layer_norm(&layer.norm_1, x.clone());
            x = x + dropout(&layer.dropout, feed_forward(&layer.pwff, h));
        }
        layer_norm(&self.enc_norm, x)
    }

    /// Logits `[batch, target, vocab]` for every target position.
    pub fn decode(
        &self,
        tgt: Tensor<B, 2, Int>,
        tgt_pad: Tensor<B, 2, Bool>,
        memory: Tensor<B, 3>,
        src_pad: Tensor<B, 2, Bool>,
    ) -> Tensor<B, 3> {
        self.project(self.decode_hidden(tgt, tgt_pad, memory, src_pad))
    }

    /// The decoder's final hidden states `[batch, target, d_model]`, before the projection
    /// to the vocabulary (generation projects only the positions it needs).
    pub fn decode_hidden(
        &self,
        tgt: Tensor<B, 2, Int>,
        tgt_pad: Tensor<B, 2, Bool>,
        memory: Tensor<B, 3>,
        src_pad: Tensor<B, 2, Bool>,
    ) -> Tensor<B, 3> {
        let [_, t] = tgt.dims();
        // Position i may not see j > i; the same for every row.
        let causal = generate_autoregressive_mask::<B>(1, t, &tgt.device());
        let mut x = self.embed(tgt);
        let dtype = x.dtype();
        let self_bias = pad_bias(tgt_pad, dtype) + bias(causal.reshape([1, 1, t, t]), dtype);
        let src_bias = pad_bias(src_pad, dtype);
        for layer in &self.decoder.layers {
            let h = layer_norm(&layer.norm_3, x.clone());
            let a = attention(&layer.self_attn, h.clone(), h, self_bias.clone());
            x = x + dropout(&layer.dropout, a);
            let h = layer_norm(&layer.norm_1, x.clone());
            let a = attention(&layer.cross_attn, h, memory.clone(), src_bias.clone());
            x = x + dropout(&layer.dropout, a);
            let h = layer_norm(&layer.norm_2, x.clone());
            x = x + dropout(&layer.dropout, feed_forward(&layer.pwff, h));
        }
        layer_norm(&self.dec_norm, x)
    }

    /// Hidden states to vocabulary logits through the (tied) embedding matrix.
    pub fn project(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = h.dims();
        let w = self.embed.weight.val();
        let vocab = w.dims()[0];
        let rows = h.reshape([b * t, d]);
        crate::fused::product(&rows, &w, true, None)
            .unwrap_or_else(|| rows.matmul(exact_transpose(w)))
            .reshape([b, t, vocab])
    }
}

/// `w` transposed, holding the same values. A block-quantized matrix (the `dynamic`
/// scheme's) is dequantized first: flex transposes one by dequantizing it and quantizing the
/// result again in blocks along its other axis, a second rounding (int8 logits 1e-3 off the
/// values the blocks stand for), and cubecl 0.10 reads a transposed one back in its stored
/// packing (a `dynamic` model on an H100 decoded one token over and over). Its products
/// dequantize it whole anyway on both.
pub(crate) fn exact_transpose<B: Backend>(w: Tensor<B, 2>) -> Tensor<B, 2> {
    match w.dtype() {
        burn::tensor::DType::QFloat(_) => w.dequantize().transpose(),
        _ => w.transpose(),
    }
}

/// Token embeddings `[batch, time, d]` of `tokens` `[batch, time]`.
///
/// Training on a GPU takes another route than burn's `Embedding`. Its gradient is a
/// select-add of the `batch * time` output rows into the table, and CubeCL's kernel for that
/// runs one thread per column (256 for `mini`), each walking all rows in turn: ~1 ms a
/// launch on an H100, measured at a quarter of a step's kernel time. Here the lookup is a
/// gather from the table seen `lanes` times side by side (a broadcast view, nothing copied),
/// row `i * lanes + l` read through copy `l`. Its gradient is a scatter-add whose kernel
/// runs one thread per (copy, column), each walking `1/lanes` of the rows, and then a sum
/// over the copies: the same values, added in another order. The CPU (its own fused
/// steps) and inference (no gradient) keep burn's lookup.
fn token_lookup<B: Backend>(embed: &Embedding<B>, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    if on_cpu::<B>() || !B::ad_enabled(&tokens.device()) {
        return embed.forward(tokens);
    }
    lanes_lookup(embed.weight.val(), tokens)
}

/// [`token_lookup`]'s gather through side-by-side copies of `table` `[vocab, d]`.
fn lanes_lookup<B: Backend>(table: Tensor<B, 2>, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let [b, t] = tokens.dims();
    let [v, d] = table.dims();
    let lanes = scatter_lanes(b * t, v * d);
    let ids = tokens.reshape([b * t / lanes, lanes, 1]).repeat_dim(2, d);
    table
        .reshape([v, 1, d])
        .expand([v, lanes, d])
        .gather(0, ids)
        .reshape([b, t, d])
}

/// How many copies of a table of `table` values a lookup of `rows` rows scatters its
/// gradient into: a power of two up to 16 that divides `rows`, with the copies together at
/// most 2^25 values (128 MiB in f32: `mini`'s table 16 times, `spec512`'s 8 times), so
/// zeroing and summing them stays far cheaper than the walk they shorten.
fn scatter_lanes(rows: usize, table: usize) -> usize {
    let mut lanes = 1;
    while lanes < 16 && rows.is_multiple_of(2 * lanes) && table * 2 * lanes <= 1 << 25 {
        lanes *= 2;
    }
    lanes
}

/// A linear layer over the last dimension of `[batch, time, d]`, with batch and time
/// flattened into one dimension of rows. burn's `Linear` on a 3-D input runs one matrix
/// product per batch row (repacking the weight for each) and, in training, computes the
/// weight's gradient as one product per row summed through a `[batch, d_in, d_out]`
/// temporary; on rows it is one product each way.
pub(crate) fn linear<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, t, d] = x.dims();
    let y = linear_rows(layer, x.reshape([b * t, d]));
    let n = y.dims()[1];
    y.reshape([b, t, n])
}

/// A linear layer over rows `[rows, d_in]`.
pub(crate) fn linear_rows<B: Backend>(layer: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let bias = layer.bias.as_ref().map(|b| b.val());
    if let Some(y) = crate::fused::product(&x, &layer.weight.val(), false, bias.as_ref()) {
        return y;
    }
    let y = matmul(x, layer.weight.val());
    match &layer.bias {
        Some(bias) => y + bias.val().unsqueeze(),
        None => y,
    }
}

/// What masking adds to an attention score where attention is not allowed (the value burn
/// masks with, rather than -inf; `generate`'s generic decoding step adds the same biases, and
/// the CPU's leaves those positions out, which comes to the same): its weight after the
/// softmax is exactly 0 in f32.
const MASK_BIAS: f32 = -1.0e4;

/// A mask (true: not allowed) as scores' bias: 0 where allowed, [`MASK_BIAS`] where not.
/// Adding a bias instead of filling the masked scores makes masking free in the backward
/// pass (the gradient passes the addition unchanged; the bias is a constant), where
/// burn-flex's `mask_fill` materialised the broadcast mask element by element in every
/// layer: 3% of a CPU training step.
/// `dtype`: the scores' (bf16 under mixed precision).
pub(crate) fn bias<B: Backend>(mask: Tensor<B, 4, Bool>, dtype: DType) -> Tensor<B, 4> {
    let zeros = Tensor::<B, 4>::zeros(mask.dims(), &mask.device());
    let zeros = match dtype {
        DType::F32 => zeros,
        other => zeros.cast(FloatDType::from(other)),
    };
    zeros.mask_fill(mask, MASK_BIAS)
}

/// Key padding `[batch, kv]` (true at padding) as a bias `[batch, 1, 1, kv]`.
fn pad_bias<B: Backend>(pad: Tensor<B, 2, Bool>, dtype: DType) -> Tensor<B, 4> {
    let [b, s] = pad.dims();
    bias(pad.reshape([b, 1, 1, s]), dtype)
}

/// Multi-head attention with burn's parameters: `query_in` attends over `kv_in`, `bias`
/// (`[batch or 1, 1, query or 1, kv]`, from [`bias`]) added to the scores. Dropout applies
/// to the attention weights after the softmax, as in PyTorch (burn's own layer drops raw
/// scores before it).
fn attention<B: Backend>(
    mha: &MultiHeadAttention<B>,
    query_in: Tensor<B, 3>,
    kv_in: Tensor<B, 3>,
    bias: Tensor<B, 4>,
) -> Tensor<B, 3> {
    let [b, t, d] = query_in.dims();
    let s = kv_in.dims()[1];
    let (h, dk) = (mha.n_heads, mha.d_k);
    let q = linear(&mha.query, query_in);
    let k = linear(&mha.key, kv_in.clone());
    let v = linear(&mha.value, kv_in);
    let root = (dk as f32).sqrt();
    let device = q.device();
    let keep = || cpu_keep_mask::<B>(&mha.dropout, &device);
    let context = match crate::fused::attention([q, k, v], h, root, &bias, keep) {
        Ok(context) => context,
        Err([q, k, v]) => {
            let split = |x: Tensor<B, 3>, len: usize| x.reshape([b, len, h, dk]).swap_dims(1, 2);
            let scores = split(q, t).matmul(split(k, s).swap_dims(2, 3));
            let weights = crate::fused::gpu::attention_weights(scores, root, bias);
            let weights = dropout(&mha.dropout, weights);
            matmul(weights, split(v, s))
                .swap_dims(1, 2)
                .reshape([b, t, d])
        }
    };
    linear(&mha.output, context)
}

fn feed_forward<B: Backend>(ff: &PositionWiseFeedForward<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let inner = ff.activation.forward(linear(&ff.linear_inner, x));
    linear(&ff.linear_outer, dropout(&ff.dropout, inner))
}

/// Dropout, as burn's (identity outside training), with the CPU's masks made differently.
///
/// burn draws every mask value from one ChaCha generator on one thread, then multiplies
/// twice (mask, then 1/keep): about 15% of a `mini` training step on the CPU, whose
/// attention weights alone take 50M mask values per step. Here, on the CPU backend, a key
/// (see [`key_dropout`]) makes a [`KeepMask`], a hash of each value's index made on every
/// core as the input is multiplied, and again in the backward pass; no mask tensor is
/// drawn or stored. Other backends keep burn's dropout.
fn dropout<B: Backend, const D: usize>(layer: &Dropout, x: Tensor<B, D>) -> Tensor<B, D> {
    let device = x.device();
    if !B::ad_enabled(&device) || layer.prob == 0.0 {
        return x;
    }
    if !on_cpu::<B>() {
        return crate::fused::gpu::dropout(layer, x);
    }
    match cpu_keep_mask::<B>(layer, &device) {
        Some(mask) => crate::fused::dropout(x, mask),
        None => x,
    }
}

thread_local! {
    /// This thread's CPU dropout keys: the seed [`key_dropout`] set, and how many masks
    /// have been keyed from it since.
    static DROPOUT_KEYS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Keys the CPU dropout masks of the forward passes that follow on this thread: the n-th
/// mask after this call is a function of `seed` and n alone. Not burn's generator: that
/// one is the whole process's, and a stage running beside a training (another training,
/// a model loaded) would move it between the training's seed and its draws.
pub fn key_dropout(seed: u64) {
    DROPOUT_KEYS.set((seed, 0));
}

/// The seed [`key_dropout`] last set on this thread.
pub fn dropout_seed() -> u64 {
    DROPOUT_KEYS.get().0
}

/// Seeds a training step's randomness with `seed`: the CPU's dropout masks on this thread
/// ([`key_dropout`]), and where the backend keeps burn's dropout (GPUs), burn's generator.
/// Only the CPU's masks are kept from other stages' draws; the GPU's are drawn from the
/// backend's one generator during the step.
pub fn seed_step<B: Backend>(device: &B::Device, seed: u64) {
    key_dropout(seed);
    if !on_cpu::<B>() {
        let _held = hold_generator();
        B::seed(device, seed);
    }
}

/// The CPU dropout's mask (see [`crate::fused::KeepMask`]), or None where dropout does
/// nothing (not training, probability 0). Its key is the next of this thread's
/// ([`key_dropout`]): masks are a function of the seed and the step, which resumed runs
/// rely on, and of nothing another thread does.
fn cpu_keep_mask<B: Backend>(layer: &Dropout, device: &B::Device) -> Option<KeepMask> {
    if !B::ad_enabled(device) || layer.prob == 0.0 {
        return None;
    }
    let (seed, made) = DROPOUT_KEYS.get();
    DROPOUT_KEYS.set((seed, made + 1));
    // A stream apart from the cut points' `mix(step_seed ^ row)`, drawn from the same seed.
    let key = crate::data::mix(crate::data::mix(seed ^ DROPOUT_STREAM) ^ made);
    Some(KeepMask::new(key, 1.0 - layer.prob))
}

/// Sets the dropout keys' stream apart from the other draws made from a step's seed.
const DROPOUT_STREAM: u64 = 0x6472_6f70_6f75_7421;

/// `lhs.matmul(rhs)`, steering clear of a cubecl 0.10 bug on GPU backends. A product with a
/// single `lhs` row and a row-major `rhs` (in decoding: every linear layer at batch 1, and
/// attention weights times values at any batch) can be handed by the autotuner to its
/// vector-matrix kernel, which then refuses that layout and panics ("Vecmat plane parallel
/// only supports col major rhs"); seen on an H100. Such a product gets a duplicate second row
/// there, which makes it an ordinary matrix product. The CPU backend runs it as it is.
pub(crate) fn matmul<B: Backend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
) -> Tensor<B, D> {
    if lhs.dims()[D - 2] != 1 || on_cpu::<B>() {
        return lhs.matmul(rhs);
    }
    matmul_two_rows(lhs, rhs)
}

/// A one-row product computed as a two-row one (the row twice), keeping the first row.
fn matmul_two_rows<B: Backend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
) -> Tensor<B, D> {
    Tensor::cat(vec![lhs.clone(), lhs], D - 2)
        .matmul(rhs)
        .narrow(D - 2, 0, 1)
}

/// Mean token cross-entropy over the non-padding targets, with optional label smoothing.
/// burn's `CrossEntropyLoss` averages over padding too, which makes the loss depend on how
/// much padding a batch has; this does not.
pub fn masked_cross_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    pad: Tensor<B, 2, Bool>,
    real_tokens: usize,
    smoothing: f64,
) -> Tensor<B, 1> {
    let per_token = match crate::fused::cross_entropy(&logits, &targets, smoothing) {
        Some(per_token) => per_token,
        None => {
            let [b, t, _] = logits.dims();
            let logp = burn::tensor::activation::log_softmax(logits, 2);
            let nll = logp
                .clone()
                .gather(2, targets.reshape([b, t, 1]))
                .reshape([b, t])
                .neg();
            if smoothing > 0.0 {
                let uniform = logp.mean_dim(2).reshape([b, t]).neg();
                nll * (1.0 - smoothing) + uniform * smoothing
            } else {
                nll
            }
        }
    };
    let masked = per_token.mask_fill(pad, 0.0);
    // On the CPU in an order fixed by the code, the same on every machine.
    let total = crate::fused::loss_sum(&masked).unwrap_or_else(|| masked.sum());
    total / (real_tokens.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_one_row_product_through_two_rows_is_the_same_product() {
        use burn::backend::Flex;
        let device = Default::default();
        let values =
            |n: usize| -> Vec<f32> { (0..n).map(|i| (i % 13) as f32 * 0.25 - 1.5).collect() };
        // Linear layers' shape: one row times a row-major weight.
        let x = Tensor::<Flex, 2>::from_data(TensorData::new(values(8), [1, 8]), &device);
        let w = Tensor::<Flex, 2>::from_data(TensorData::new(values(8 * 5), [8, 5]), &device);
        let (a, b) = (x.clone().matmul(w.clone()), matmul_two_rows(x, w));
        assert_eq!(b.dims(), [1, 5]);
        a.into_data().assert_eq(&b.into_data(), true);
        // Attention's shape: per (row, head), one query's weights times the values.
        let p =
            Tensor::<Flex, 4>::from_data(TensorData::new(values(2 * 3 * 6), [2, 3, 1, 6]), &device);
        let v = Tensor::<Flex, 4>::from_data(
            TensorData::new(values(2 * 3 * 6 * 4), [2, 3, 6, 4]),
            &device,
        );
        let (a, b) = (p.clone().matmul(v.clone()), matmul_two_rows(p, v));
        assert_eq!(b.dims(), [2, 3, 1, 4]);
        a.into_data().assert_eq(&b.into_data(), true);
    }

    #[test]
    fn a_lookup_through_copies_has_burns_values_and_gradient() {
        use burn::backend::{Autodiff, Flex};
        use burn::tensor::Tolerance;
        type A = Autodiff<Flex>;
        let device = Default::default();
        // 32 lookups, ids repeating, of an 11-row table: 16 copies.
        let (v, d, b, t) = (11, 6, 4, 8);
        assert_eq!(scatter_lanes(b * t, v * d), 16);
        let table: Vec<f32> = (0..v * d)
            .map(|i| (i * 7 % 13) as f32 * 0.1 - 0.6)
            .collect();
        let ids: Vec<i64> = (0..b * t).map(|i| ((i * 5 + 3) % v) as i64).collect();
        let upstream: Vec<f32> = (0..b * t * d).map(|i| (i * 3 % 17) as f32 * 0.05).collect();
        let run = |lanes: bool| {
            let table = Tensor::<A, 2>::from_data(TensorData::new(table.clone(), [v, d]), &device)
                .require_grad();
            let tokens =
                Tensor::<A, 2, Int>::from_data(TensorData::new(ids.clone(), [b, t]), &device);
            let out = match lanes {
                true => lanes_lookup(table.clone(), tokens),
                false => burn::tensor::module::embedding(table.clone(), tokens),
            };
            let w =
                Tensor::<A, 3>::from_data(TensorData::new(upstream.clone(), [b, t, d]), &device);
            let grads = (out.clone() * w).sum().backward();
            (out.into_data(), table.grad(&grads).unwrap().into_data())
        };
        let ((out, grad), (lanes_out, lanes_grad)) = (run(false), run(true));
        out.assert_eq(&lanes_out, true);
        grad.assert_approx_eq::<f32>(&lanes_grad, Tolerance::default());
    }

    #[test]
    fn scatter_lanes_divide_the_rows_within_the_memory_bound() {
        assert_eq!(scatter_lanes(32 * 128, 8000 * 256), 16);
        assert_eq!(scatter_lanes(32 * 128, 8000 * 512), 8);
        assert_eq!(scatter_lanes(3 * 16, 8000 * 256), 16);
        assert_eq!(scatter_lanes(12, 100), 4);
        assert_eq!(scatter_lanes(7, 100), 1);
    }

    #[test]
    fn dropout_masks_keep_the_asked_share_scaled_and_repeat_for_a_key() {
        let n = 1_000_003;
        let a = KeepMask::new(42, 0.9).values(n);
        let kept = a.iter().filter(|&&m| m != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.9).abs() < 0.002, "kept {kept}");
        assert!(a.iter().all(|&m| m == 0.0 || (m - 1.0 / 0.9).abs() < 1e-6));
        assert_eq!(a, KeepMask::new(42, 0.9).values(n));
        assert_ne!(a, KeepMask::new(43, 0.9).values(n));
        // Keys differing in their high half alone give other masks too.
        assert_ne!(a, KeepMask::new(42 | 1 << 40, 0.9).values(n));
    }
}
