//! One decoding step for every row of a batch, on the CPU, in plain loops over the weights
//! and the key/value buffers (the generic step in `generate.rs` is the reference; the tests
//! there decode through both and compare tokens). Its logits equal the generic step's up to
//! rounding (sums in another order, Cephes' exponential, a two-pass norm), so tokens agree
//! except where two logits tie within a few units in the last place.
//!
//! At batch 1 a step is bound by reading the weights (22 MB for `mini`, at most about
//! 27 GB/s on one core here), and the generic step added about 40% on top: some fifty burn
//! operations per layer, each allocating its output and dispatching through the backend,
//! for vectors of 256 values. Here the products are the only real work: `[rows, d]` times
//! each weight matrix, through the same `gemm` library burn-flex uses, and everything else
//! (norms, attention over the buffer up to each row's own position, residuals) is a loop
//! over a few hundred values in cache. Used for f32 weights and ReLU feed-forward layers
//! (the models `train` makes); others keep the generic step.

use burn::module::Param;
use burn::nn::activation::Activation;
use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use burn::tensor::DType;
use burn_flex::FlexTensor;

use crate::fused::{from_start, gemm_into, try_concrete, Operand, LAYER_NORM_EPS};
use crate::model::Seq2Seq;
use crate::rowmath;

/// A weight matrix `[d_in, d_out]` and its bias.
struct Dense {
    w: FlexTensor,
    b: Option<FlexTensor>,
    d_out: usize,
}

struct Norm {
    gamma: FlexTensor,
    beta: Option<FlexTensor>,
}

struct Layer {
    self_norm: Norm,
    query: Dense,
    key: Dense,
    value: Dense,
    self_out: Dense,
    cross_norm: Norm,
    cross_query: Dense,
    cross_out: Dense,
    ff_norm: Norm,
    inner: Dense,
    outer: Dense,
}

/// The decoder's weights, borrowed (shared buffers, no copies) from a flex model.
pub(crate) struct Weights {
    layers: Vec<Layer>,
    final_norm: Norm,
    /// The tied embedding `[vocab, d_model]`, the output projection's transpose: read as
    /// it is stored (each logit is one row's dot product with the hidden state).
    embedding: FlexTensor,
    /// The learned positions `[max_len, d_model]`.
    positions: FlexTensor,
    heads: usize,
    d: usize,
}

/// `x` as flex's tensor (contiguous, from the start of its buffer) when `B` is flex and
/// `x` is f32.
fn flex<B: Backend, const D: usize>(x: Tensor<B, D>) -> Option<FlexTensor> {
    if x.dtype() != DType::F32 {
        return None;
    }
    try_concrete::<B, FlexTensor, D>(x).map(from_start)
}

fn param<B: Backend, const D: usize>(p: &Param<Tensor<B, D>>) -> Option<FlexTensor> {
    flex(p.val())
}

/// An optional parameter (a bias): Some(None) when absent, None when present but not flex's.
fn optional<B: Backend>(p: &Option<Param<Tensor<B, 1>>>) -> Option<Option<FlexTensor>> {
    match p {
        Some(p) => param(p).map(Some),
        None => Some(None),
    }
}

impl Dense {
    fn of<B: Backend>(l: &Linear<B>) -> Option<Self> {
        Some(Dense {
            w: param(&l.weight)?,
            b: optional(&l.bias)?,
            d_out: l.weight.dims()[1],
        })
    }

    /// `x [rows, d_in] · w + b`.
    fn apply(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let d_in = x.len() / rows;
        let n = self.d_out;
        let mut y = match &self.b {
            Some(b) => b.storage::<f32>()[..n].repeat(rows),
            None => vec![0.0; rows * n],
        };
        let lhs = Operand::rows(x, d_in);
        let rhs = Operand::rows(&self.w.storage::<f32>()[..d_in * n], n);
        gemm_into(&mut y, true, [rows, d_in, n], lhs, rhs);
        y
    }
}

impl Norm {
    fn of<B: Backend>(n: &LayerNorm<B>) -> Option<Self> {
        Some(Norm {
            gamma: param(&n.gamma)?,
            beta: optional(&n.beta)?,
        })
    }

    fn apply(&self, x: &[f32], d: usize) -> Vec<f32> {
        let gamma = &self.gamma.storage::<f32>()[..d];
        let beta = self.beta.as_ref().map(|b| &b.storage::<f32>()[..d]);
        let mut out = vec![0f32; x.len()];
        for (y, x) in out.chunks_mut(d).zip(x.chunks(d)) {
            let mean = rowmath::sum(x) / d as f32;
            let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let rstd = 1.0 / (var + LAYER_NORM_EPS).sqrt();
            for i in 0..d {
                y[i] = (x[i] - mean) * rstd * gamma[i] + beta.map_or(0.0, |b| b[i]);
            }
        }
        out
    }
}

impl Weights {
    /// The weights of `model`'s decoder, or None where this step does not apply (another
    /// backend, weights not f32, an activation other than ReLU).
    pub(crate) fn of<B: Backend>(model: &Seq2Seq<B>) -> Option<Self> {
        let layers = model
            .decoder
            .layers
            .iter()
            .map(|l| {
                if !matches!(l.pwff.activation, Activation::Relu(_)) {
                    return None;
                }
                Some(Layer {
                    self_norm: Norm::of(&l.norm_3)?,
                    query: Dense::of(&l.self_attn.query)?,
                    key: Dense::of(&l.self_attn.key)?,
                    value: Dense::of(&l.self_attn.value)?,
                    self_out: Dense::of(&l.self_attn.output)?,
                    cross_norm: Norm::of(&l.norm_1)?,
                    cross_query: Dense::of(&l.cross_attn.query)?,
                    cross_out: Dense::of(&l.cross_attn.output)?,
                    ff_norm: Norm::of(&l.norm_2)?,
                    inner: Dense::of(&l.pwff.linear_inner)?,
                    outer: Dense::of(&l.pwff.linear_outer)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Weights {
            layers,
            final_norm: Norm::of(&model.dec_norm)?,
            embedding: param(&model.embed.weight)?,
            positions: param(&model.pos.weight)?,
            heads: model.n_heads(),
            d: model.d_model(),
        })
    }
}

/// One layer's buffers, `[rows, heads, len, dk]`, contiguous from the start of their
/// storage: keys and values of the positions decoded so far (self, written here) and of
/// the source (cross).
pub(crate) struct Buffers<'a> {
    pub self_k: &'a mut FlexTensor,
    pub self_v: &'a mut FlexTensor,
    pub cross_k: &'a FlexTensor,
    pub cross_v: &'a FlexTensor,
}

impl Weights {
    /// Each row's input: its token's embedding times `sqrt(d)` plus its position's (as
    /// `Seq2Seq::embed_at`).
    fn embed(&self, tokens: &[u32], positions: &[usize]) -> Vec<f32> {
        let d = self.d;
        let scale = (d as f64).sqrt() as f32;
        let (table, places) = (
            self.embedding.storage::<f32>(),
            self.positions.storage::<f32>(),
        );
        let mut x = Vec::with_capacity(tokens.len() * d);
        for (&t, &p) in tokens.iter().zip(positions) {
            let (e, q) = (&table[t as usize * d..][..d], &places[p * d..][..d]);
            x.extend(e.iter().zip(q).map(|(&e, &q)| e * scale + q));
        }
        x
    }
}

/// The logits `[rows, vocab]` of one decoding step: row `r` is token `tokens[r]` at position
/// `positions[r]`, its source `src_lens[r]` tokens long. Writes each row's key and value
/// into its layer buffers at its position.
pub(crate) fn step(
    w: &Weights,
    buffers: &mut [Buffers],
    tokens: &[u32],
    positions: &[usize],
    src_lens: &[usize],
) -> Vec<f32> {
    let mut x = w.embed(tokens, positions);
    let (rows, d, h) = (positions.len(), w.d, w.heads);
    let dk = d / h;
    let scale = 1.0 / (dk as f32).sqrt();
    let mut context = vec![0f32; rows * d];
    let mut scores = Vec::new();
    for (layer, buf) in w.layers.iter().zip(buffers.iter_mut()) {
        // Self-attention over each row's positions up to its own, after writing it.
        let hidden = layer.self_norm.apply(&x, d);
        let q = layer.query.apply(&hidden, rows);
        let k = layer.key.apply(&hidden, rows);
        let v = layer.value.apply(&hidden, rows);
        let capacity = buf.self_k.layout().shape()[2];
        let (keys, values) = (
            buf.self_k.storage_mut::<f32>(),
            buf.self_v.storage_mut::<f32>(),
        );
        for (r, &p) in positions.iter().enumerate() {
            // Beyond the buffer, a write would land in the next row's keys.
            assert!(
                p < capacity,
                "position {p} beyond the key/value buffer ({capacity})"
            );
            for head in 0..h {
                let at = ((r * h + head) * capacity + p) * dk;
                let from = r * d + head * dk;
                keys[at..at + dk].copy_from_slice(&k[from..from + dk]);
                values[at..at + dk].copy_from_slice(&v[from..from + dk]);
            }
        }
        let (keys, values) = (buf.self_k.storage::<f32>(), buf.self_v.storage::<f32>());
        let lens: Vec<usize> = positions.iter().map(|&p| p + 1).collect();
        let span = [h, capacity, dk];
        attend_rows(
            &q,
            [keys, values],
            span,
            &lens,
            scale,
            &mut scores,
            &mut context,
        );
        add(&mut x, &layer.self_out.apply(&context, rows));

        // Cross-attention over the source's keys and values (computed once, at admission).
        let hidden = layer.cross_norm.apply(&x, d);
        let q = layer.cross_query.apply(&hidden, rows);
        let s = buf.cross_k.layout().shape()[2];
        let (keys, values) = (buf.cross_k.storage::<f32>(), buf.cross_v.storage::<f32>());
        // No source positions at all: burn's step masks every one, which shifts them all
        // alike and so attends over all of them.
        let lens: Vec<usize> = src_lens
            .iter()
            .map(|&len| if len == 0 { s } else { len.min(s) })
            .collect();
        let span = [h, s, dk];
        attend_rows(
            &q,
            [keys, values],
            span,
            &lens,
            scale,
            &mut scores,
            &mut context,
        );
        add(&mut x, &layer.cross_out.apply(&context, rows));

        let hidden = layer.ff_norm.apply(&x, d);
        let mut inner = layer.inner.apply(&hidden, rows);
        inner.iter_mut().for_each(|v| *v = v.max(0.0));
        add(&mut x, &layer.outer.apply(&inner, rows));
    }
    let hidden = w.final_norm.apply(&x, d);
    let vocab = w.embedding.layout().shape()[0];
    let mut logits = vec![0f32; rows * vocab];
    let lhs = Operand::rows(&hidden, d);
    let rhs = Operand::rows(&w.embedding.storage::<f32>()[..vocab * d], d).transpose();
    gemm_into(&mut logits, false, [rows, d, vocab], lhs, rhs);
    logits
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, &y)| *x += y);
}

/// One head of one row: `q` `[dk]` over the first `len` positions of `keys` / `values`
/// (`[positions, dk]` from their start), into `out` `[dk]`.
/// Every row's every head attending over the first `lens[r]` of its `[h, positions, dk]`
/// lane of `keys`/`values` (`span` = `[h, positions, dk]`), into `context` `[rows, h * dk]`.
fn attend_rows(
    q: &[f32],
    [keys, values]: [&[f32]; 2],
    [h, positions, dk]: [usize; 3],
    lens: &[usize],
    scale: f32,
    scores: &mut Vec<f32>,
    context: &mut [f32],
) {
    let d = h * dk;
    for (r, &len) in lens.iter().enumerate() {
        for head in 0..h {
            let lane = (r * h + head) * positions * dk;
            let at = r * d + head * dk;
            attend_head(
                &q[at..at + dk],
                &keys[lane..],
                &values[lane..],
                len,
                scale,
                scores,
                &mut context[at..at + dk],
            );
        }
    }
}

fn attend_head(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    len: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let dk = q.len();
    scores.clear();
    scores.extend(
        keys.chunks_exact(dk)
            .take(len)
            .map(|k| rowmath::dot(q, k) * scale),
    );
    let top = rowmath::max(scores);
    scores.iter_mut().for_each(|s| *s = rowmath::exp(*s - top));
    let inv = 1.0 / rowmath::sum(scores);
    out.iter_mut().for_each(|o| *o = 0.0);
    for (&weight, v) in scores.iter().zip(values.chunks_exact(dk)) {
        let weight = weight * inv;
        out.iter_mut().zip(v).for_each(|(o, &v)| *o += weight * v);
    }
}
