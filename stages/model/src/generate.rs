//! Generation: the encoder runs once per request; the decoder keeps, per layer, key/value
//! buffers of a fixed capacity that each step writes one position into, and attends over
//! the whole buffer with the unwritten positions masked. Shapes change only when a row
//! joins or leaves (on a GPU: few kernel compiles), and no step recomputes the prefix.
//!
//! A [`Batch`] decodes its rows together, one step for all of them, each row at its own
//! position: rows join between steps (continuous batching: a server admits new requests
//! without waiting for the longest one in flight) and leave when they finish (end of text,
//! a stop, their token budget, or a caller that went away). [`generate`] runs one batch of
//! rows to the end.

use burn::prelude::*;
use burn::tensor::activation::softmax;

use burn_flex::FlexTensor;

use crate::data::Specials;
use crate::decode_cpu;
use crate::fused::{from_concrete, to_concrete};
use crate::model::{bias, exact_transpose, linear, linear_rows, matmul, Seq2Seq};

/// Temperatures below this decode greedily. Sampling at 1e-4 already picks the likeliest
/// token unless another is within about a thousandth of a nat of it, and far smaller ones
/// (down to f32's subnormals, 1e-45) once overflowed the scaled scores to inf/NaN.
pub const MIN_TEMPERATURE: f32 = 1e-4;

/// How one row picks its next token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Below [`MIN_TEMPERATURE`] (0 included) means greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    /// Locally typical sampling (Meister et al., TGI's and transformers' `typical_p`): the
    /// tokens whose surprise is nearest the distribution's entropy, as many as make up this
    /// share of the probability.
    pub typical_p: Option<f32>,
    /// Above 1 discourages tokens already generated (as in the CTRL paper and TGI).
    pub repetition_penalty: Option<f32>,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            typical_p: None,
            repetition_penalty: None,
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature < MIN_TEMPERATURE
    }
}

/// One row of a generation batch.
#[derive(Clone, Debug)]
pub struct Row {
    /// Encoder input: control tokens then the prompt.
    pub src: Vec<u32>,
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    /// Keep going past end-of-text (latency measurements want a fixed length).
    pub ignore_eos: bool,
}

impl Row {
    /// The tokens this row may generate: its own limit, within a position table of
    /// `max_len`, at least one. Its last token is the one at index `budget - 1`.
    pub fn budget(&self, max_len: usize) -> usize {
        self.max_new_tokens.min(max_len).max(1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// The token budget ran out.
    Length,
    /// The model produced end-of-text.
    EosToken,
    /// The caller stopped it (a stop sequence matched).
    StopSequence,
    /// The caller is gone (a client that disconnected).
    Cancelled,
}

/// What the caller says after seeing a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    Stop(Finish),
}

/// A generated token as the caller sees it.
#[derive(Clone, Copy, Debug)]
pub struct Token {
    pub id: u32,
    /// Natural log of the model's probability of this token (before sampling filters).
    pub logprob: f32,
    /// The step (0-based) within this row.
    pub index: usize,
}

struct LayerCache<B: Backend> {
    self_k: Tensor<B, 4>,
    self_v: Tensor<B, 4>,
    cross_k: Tensor<B, 4>,
    cross_v: Tensor<B, 4>,
}

/// The rows' state between steps.
struct State<B: Backend> {
    layers: Vec<LayerCache<B>>,
    /// Source positions the cross-attention buffers hold (rows' sources, right-padded).
    /// The masks are rebuilt from each row's length at every step rather than kept as
    /// bool tensors: burn-flex stores bool tensors made different ways with different
    /// dtypes and refuses to concatenate them.
    src_len: usize,
    device: B::Device,
}

impl<B: Backend> State<B> {
    /// Keeps only the rows at `keep` (indices into the current rows).
    fn retain(self, keep: &[usize], device: &B::Device) -> Self {
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(keep.iter().map(|&i| i as i64).collect(), [keep.len()]),
            device,
        );
        State {
            layers: self
                .layers
                .into_iter()
                .map(|l| LayerCache {
                    self_k: l.self_k.select(0, idx.clone()),
                    self_v: l.self_v.select(0, idx.clone()),
                    cross_k: l.cross_k.select(0, idx.clone()),
                    cross_v: l.cross_v.select(0, idx.clone()),
                })
                .collect(),
            src_len: self.src_len,
            device: self.device,
        }
    }

    fn rows(&self) -> usize {
        self.layers.first().map_or(0, |l| l.cross_k.dims()[0])
    }

    /// Writes `fresh`'s first `holes.len()` rows' cross-attention keys and values into the
    /// rows at `holes` (which the caller has made wide enough).
    fn fill(self, holes: &[usize], fresh: &State<B>) -> Self {
        if holes.is_empty() {
            return self;
        }
        let at: Vec<(usize, usize)> = holes.iter().map(|&r| (r, 0)).collect();
        let first = |x: &Tensor<B, 4>| {
            let [_, h, s, dk] = x.dims();
            x.clone().slice([0..holes.len(), 0..h, 0..s, 0..dk])
        };
        State {
            layers: self
                .layers
                .into_iter()
                .zip(&fresh.layers)
                .map(|(l, f)| LayerCache {
                    self_k: l.self_k,
                    self_v: l.self_v,
                    cross_k: write_rows(l.cross_k, &at, first(&f.cross_k)),
                    cross_v: write_rows(l.cross_v, &at, first(&f.cross_v)),
                })
                .collect(),
            src_len: self.src_len,
            device: self.device,
        }
    }

    fn capacity(&self) -> usize {
        self.layers.first().map_or(0, |l| l.self_k.dims()[2])
    }

    /// Appends `other`'s rows after this state's, first widening whichever has the smaller
    /// key/value capacity or the shorter source (zeros, masked as padding).
    fn append(self, other: State<B>) -> Self {
        let capacity = self.capacity().max(other.capacity());
        let src = self.src_len.max(other.src_len);
        let (a, b) = (self.widen(capacity, src), other.widen(capacity, src));
        State {
            layers: a
                .layers
                .into_iter()
                .zip(b.layers)
                .map(|(x, y)| LayerCache {
                    self_k: Tensor::cat(vec![x.self_k, y.self_k], 0),
                    self_v: Tensor::cat(vec![x.self_v, y.self_v], 0),
                    cross_k: Tensor::cat(vec![x.cross_k, y.cross_k], 0),
                    cross_v: Tensor::cat(vec![x.cross_v, y.cross_v], 0),
                })
                .collect(),
            src_len: src,
            device: a.device,
        }
    }

    fn widen(self, capacity: usize, src: usize) -> Self {
        State {
            layers: self
                .layers
                .into_iter()
                .map(|l| LayerCache {
                    self_k: pad_dim2(l.self_k, capacity),
                    self_v: pad_dim2(l.self_v, capacity),
                    cross_k: pad_dim2(l.cross_k, src),
                    cross_v: pad_dim2(l.cross_v, src),
                })
                .collect(),
            src_len: src,
            device: self.device,
        }
    }
}

/// `[rows, heads, n, dk]` with zeros appended along the positions up to `to`.
fn pad_dim2<B: Backend>(x: Tensor<B, 4>, to: usize) -> Tensor<B, 4> {
    let [rows, h, n, dk] = x.dims();
    if n >= to {
        return x;
    }
    let zeros = Tensor::zeros([rows, h, to - n, dk], &x.device());
    Tensor::cat(vec![x, zeros], 2)
}

/// Key/value capacity for rows of these budgets: rounded up to 16 positions (few distinct
/// shapes as rows come and go), within the position table.
fn capacity_for(budget: usize, max_len: usize) -> usize {
    (budget.div_ceil(16) * 16).min(max_len).max(budget)
}

fn heads<B: Backend>(x: Tensor<B, 3>, n_heads: usize) -> Tensor<B, 4> {
    let [b, t, d] = x.dims();
    x.reshape([b, t, n_heads, d / n_heads]).swap_dims(1, 2)
}

/// `[rows, d]` (one position per row) to `[rows, heads, 1, d / heads]`.
fn one_position<B: Backend>(x: Tensor<B, 2>, n_heads: usize) -> Tensor<B, 4> {
    let [rows, d] = x.dims();
    x.reshape([rows, n_heads, 1, d / n_heads])
}

/// Writes `value` `[n, heads, len, dk]` into `buffer` `[rows, heads, capacity, dk]`: row `i`
/// of `value` into row `at[i].0` of the buffer, from position `at[i].1` on.
///
/// On the CPU backend this writes in place. burn-flex 0.21's `slice_assign` copies the whole
/// destination on every call (it takes a second handle on the buffer before its
/// copy-on-write check, so the buffer always looks shared): at 32 rows that was 13 MB of
/// copying per decoding step, 14% of the step. Other backends use `slice_assign`.
fn write_rows<B: Backend>(
    buffer: Tensor<B, 4>,
    at: &[(usize, usize)],
    value: Tensor<B, 4>,
) -> Tensor<B, 4> {
    use burn::tensor::TensorPrimitive;
    use burn_flex::FlexTensor;
    use std::any::Any;

    let [_, h, len, dk] = value.dims();
    let mut buf = buffer.into_primitive().tensor();
    let val = value.into_primitive().tensor();
    let written = match (
        (&mut buf as &mut dyn Any).downcast_mut::<FlexTensor>(),
        (&val as &dyn Any).downcast_ref::<FlexTensor>(),
    ) {
        (Some(dst), Some(src)) => write_rows_flex(dst, at, src),
        _ => false,
    };
    let mut buffer = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(buf));
    if written {
        return buffer;
    }
    let value = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(val));
    // Every row, in order, at one position: one write.
    let start = at.first().map_or(0, |a| a.1);
    let in_order = at.iter().enumerate().all(|(i, &a)| a == (i, start));
    if in_order && at.len() == buffer.dims()[0] {
        return buffer.slice_assign([0..at.len(), 0..h, start..start + len, 0..dk], value);
    }
    for (i, &(r, p)) in at.iter().enumerate() {
        let row = value.clone().slice([i..i + 1, 0..h, 0..len, 0..dk]);
        buffer = buffer.slice_assign([r..r + 1, 0..h, p..p + len, 0..dk], row);
    }
    buffer
}

/// The in-place write for [`write_rows`]; false (nothing written) when the buffer is shared,
/// strided or not f32, so the caller falls back to `slice_assign`.
fn write_rows_flex(
    dst: &mut burn_flex::FlexTensor,
    at: &[(usize, usize)],
    src: &burn_flex::FlexTensor,
) -> bool {
    let f32_dtype = burn::tensor::DType::F32;
    if dst.dtype() != f32_dtype || src.dtype() != f32_dtype || !dst.is_contiguous() {
        return false;
    }
    if dst.layout().start_offset() != 0 || dst.layout().num_elements() * 4 != dst.bytes().len() {
        return false;
    }
    let (h, capacity) = (dst.layout().shape()[1], dst.layout().shape()[2]);
    let [n, _, len, dk] = [0, 1, 2, 3].map(|i| src.layout().shape()[i]);
    let fits = |&(r, p): &(usize, usize)| r < dst.layout().shape()[0] && p + len <= capacity;
    if at.len() != n || !at.iter().all(fits) {
        return false;
    }
    let src = src.to_contiguous();
    let from = &src.storage::<f32>()[src.layout().start_offset()..][..n * h * len * dk];
    let Some(to) = dst.try_storage_mut::<f32>() else {
        return false;
    };
    // One lane is one (row, head): `len` positions of `dk` values, contiguous on both sides.
    for (lane, values) in from.chunks_exact(len * dk).enumerate() {
        let (r, p) = at[lane / h];
        let at = ((r * h + lane % h) * capacity + p) * dk;
        to[at..at + len * dk].copy_from_slice(values);
    }
    true
}

/// Source ids of a batch, right-padded to a multiple of 16 (few distinct shapes).
pub fn pad_sources<B: Backend>(
    srcs: &[&[u32]],
    pad: u32,
    max_len: usize,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Bool>) {
    let longest = srcs.iter().map(|s| s.len()).max().unwrap_or(1);
    // Rounded up to 16, but not past the position table (sources are cut to it).
    let len = (longest.div_ceil(16) * 16).min(max_len).max(longest);
    let mut ids = vec![pad as i64; srcs.len() * len];
    let mut mask = vec![true; srcs.len() * len];
    for (r, s) in srcs.iter().enumerate() {
        for (j, &t) in s.iter().enumerate() {
            ids[r * len + j] = t as i64;
            mask[r * len + j] = false;
        }
    }
    (
        Tensor::from_data(TensorData::new(ids, [srcs.len(), len]), device),
        Tensor::from_data(TensorData::new(mask, [srcs.len(), len]), device),
    )
}

impl<B: Backend> Seq2Seq<B> {
    fn start(&self, srcs: &[&[u32]], pad: u32, capacity: usize, device: &B::Device) -> State<B> {
        let (src, src_pad) = pad_sources::<B>(srcs, pad, self.max_len(), device);
        let memory = self.encode(src, src_pad.clone());
        let [rows, s] = src_pad.dims();
        let heads_n = self.n_heads();
        let d = self.d_model();
        let layers = self
            .decoder
            .layers
            .iter()
            .map(|l| LayerCache {
                self_k: Tensor::zeros([rows, heads_n, capacity, d / heads_n], device),
                self_v: Tensor::zeros([rows, heads_n, capacity, d / heads_n], device),
                cross_k: heads(linear(&l.cross_attn.key, memory.clone()), heads_n),
                cross_v: heads(linear(&l.cross_attn.value, memory.clone()), heads_n),
            })
            .collect();
        State {
            layers,
            src_len: s,
            device: device.clone(),
        }
    }

    /// One decoder step for every row, row `r` at position `positions[r]` with a source of
    /// `src_lens[r]` tokens: logits `[rows, vocab]`.
    fn step(
        &self,
        state: &mut State<B>,
        tokens: &[u32],
        positions: &[usize],
        src_lens: &[usize],
        projection: &Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        let device = state.device.clone();
        let rows = tokens.len();
        let h = self.n_heads();
        let d = self.d_model();
        let dk = d / h;
        let scale = (dk as f32).sqrt();
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens.iter().map(|&t| t as i64).collect(), [rows, 1]),
            &device,
        );
        // One row per request, kept 2-D: a `[rows, d] x [d, n]` product is one matrix
        // multiplication that reads each weight once for all rows. (A `[rows, 1, d]` input
        // makes burn broadcast the weight into `rows` separate products, repacking it for
        // every row: batching then saved almost nothing.)
        let mut x = self.embed_at(ids, positions).reshape([rows, d]);
        let capacity = state.capacity();
        let placeholder = Tensor::<B, 4>::zeros([1, 1, 1, 1], &device);
        // Row r's new key and value go to its own position.
        let at: Vec<(usize, usize)> = positions.iter().copied().enumerate().collect();
        // A row's positions after its own are not written yet: masked.
        let future: Vec<bool> = positions
            .iter()
            .flat_map(|&p| (0..capacity).map(move |j| j > p))
            .collect();
        let dtype = x.dtype();
        // As scores' biases, like the uncached forward pass (broadcast over the heads).
        let future = bias(
            Tensor::<B, 4, Bool>::from_data(
                TensorData::new(future, [rows, 1, 1, capacity]),
                &device,
            ),
            dtype,
        );
        let s = state.src_len;
        let src_pad: Vec<bool> = src_lens
            .iter()
            .flat_map(|&n| (0..s).map(move |j| j >= n))
            .collect();
        let src_pad = bias(
            Tensor::<B, 4, Bool>::from_data(TensorData::new(src_pad, [rows, 1, 1, s]), &device),
            dtype,
        );
        for (layer, cache) in self.decoder.layers.iter().zip(state.layers.iter_mut()) {
            // Self-attention over the buffer, after writing this position into it.
            let hidden = layer.norm_3.forward(x.clone());
            let q = one_position(linear_rows(&layer.self_attn.query, hidden.clone()), h);
            let k = one_position(linear_rows(&layer.self_attn.key, hidden.clone()), h);
            let v = one_position(linear_rows(&layer.self_attn.value, hidden), h);
            // Moved out, not cloned: a buffer nobody else holds can be written in place.
            let self_k = std::mem::replace(&mut cache.self_k, placeholder.clone());
            cache.self_k = write_rows(self_k, &at, k);
            let self_v = std::mem::replace(&mut cache.self_v, placeholder.clone());
            cache.self_v = write_rows(self_v, &at, v);
            let scores = q
                .matmul(cache.self_k.clone().swap_dims(2, 3))
                .div_scalar(scale)
                + future.clone();
            let ctx = matmul(softmax(scores, 3), cache.self_v.clone()).reshape([rows, d]);
            x = x + linear_rows(&layer.self_attn.output, ctx);

            // Cross-attention over the encoder's keys and values, computed once.
            let hidden = layer.norm_1.forward(x.clone());
            let q = one_position(linear_rows(&layer.cross_attn.query, hidden), h);
            let scores = q
                .matmul(cache.cross_k.clone().swap_dims(2, 3))
                .div_scalar(scale)
                + src_pad.clone();
            let ctx = matmul(softmax(scores, 3), cache.cross_v.clone()).reshape([rows, d]);
            x = x + linear_rows(&layer.cross_attn.output, ctx);

            let hidden = layer.norm_2.forward(x.clone());
            let inner = layer
                .pwff
                .activation
                .forward(linear_rows(&layer.pwff.linear_inner, hidden));
            x = x + linear_rows(&layer.pwff.linear_outer, inner);
        }
        matmul(self.dec_norm.forward(x), projection.clone())
    }

    /// [`step`](Self::step) on the CPU in plain loops ([`decode_cpu`]), from the decoder's
    /// weights taken out once per batch.
    fn step_cpu(
        &self,
        weights: &decode_cpu::Weights,
        state: &mut State<B>,
        tokens: &[u32],
        positions: &[usize],
        src_lens: &[usize],
    ) -> Tensor<B, 2> {
        let device = state.device.clone();
        let rows = tokens.len();
        // The buffers move out of the state and back, so that the keys and values are
        // written in place (a buffer held twice would be copied first).
        let placeholder = Tensor::<B, 4>::zeros([1, 1, 1, 1], &device);
        let take = |t: &mut Tensor<B, 4>| -> FlexTensor {
            let t: FlexTensor = to_concrete(std::mem::replace(t, placeholder.clone()));
            crate::fused::from_start(t)
        };
        let mut owned: Vec<[FlexTensor; 4]> = state
            .layers
            .iter_mut()
            .map(|l| {
                [
                    take(&mut l.self_k),
                    take(&mut l.self_v),
                    take(&mut l.cross_k),
                    take(&mut l.cross_v),
                ]
            })
            .collect();
        let logits = {
            let mut buffers: Vec<decode_cpu::Buffers> = owned
                .iter_mut()
                .map(|[k, v, ck, cv]| decode_cpu::Buffers {
                    self_k: k,
                    self_v: v,
                    cross_k: ck,
                    cross_v: cv,
                })
                .collect();
            decode_cpu::step(weights, &mut buffers, tokens, positions, src_lens)
        };
        for (l, [k, v, ck, cv]) in state.layers.iter_mut().zip(owned) {
            l.self_k = from_concrete(k);
            l.self_v = from_concrete(v);
            l.cross_k = from_concrete(ck);
            l.cross_v = from_concrete(cv);
        }
        let vocab = logits.len() / rows;
        Tensor::from_data(TensorData::new(logits, [rows, vocab]), &device)
    }
}

/// A row in a [`Batch`]: the caller's key, the request, what it has generated so far.
struct Live {
    key: usize,
    row: Row,
    out: Vec<u32>,
    last: u32,
    rng: u64,
}

/// Rows decoded together, one step at a time; rows may join between steps.
///
/// The state's rows are slots. A finished row leaves a hole rather than being cut out at
/// once, and the next rows to join go into the holes (their cross-attention keys and
/// values written in place; the self-attention buffers need no clearing, since a row only
/// attends to positions it has written itself): under a steady stream of requests the
/// cache is neither copied to remove rows nor to add them. Holes nobody fills are closed
/// up before the next step.
pub struct Batch<'m, B: Backend> {
    model: &'m Seq2Seq<B>,
    specials: &'m Specials,
    device: B::Device,
    /// None while the batch is empty.
    state: Option<State<B>>,
    /// One per row of the state, in its order; None is a hole.
    slots: Vec<Option<Live>>,
    stepper: Stepper<B>,
}

/// How a batch computes its decoding steps.
enum Stepper<B: Backend> {
    /// The CPU's own step, from the decoder's weights (f32 flex models with ReLU layers).
    Cpu(Box<decode_cpu::Weights>),
    /// burn's operations, with the tied output projection `[d_model, vocab]` transposed
    /// once into its own contiguous buffer: burn's product with the embedding's transposed
    /// view reads it strided, and measured 1.4x (1 row) to 1.5x (16 rows) slower on the
    /// CPU.
    Generic(Tensor<B, 2>),
}

/// The tied output projection `[d, vocab]`, row-major, for the generic decoding step (a
/// copy: a product with a transposed view is slower on every backend). A quantized
/// embedding (the `dynamic` scheme) is held as f32 here: a transposed block-quantized
/// matrix cannot keep its blocks (see [`exact_transpose`]).
fn generic_projection<B: Backend>(model: &Seq2Seq<B>, device: &B::Device) -> Tensor<B, 2> {
    let w = exact_transpose(model.embed.weight.val());
    Tensor::from_data(w.into_data(), device)
}

/// A row that finished: its key, its tokens, and why.
pub type Finished = (usize, Vec<u32>, Finish);

impl<'m, B: Backend> Batch<'m, B> {
    pub fn new(model: &'m Seq2Seq<B>, specials: &'m Specials, device: &B::Device) -> Self {
        let stepper = match decode_cpu::Weights::of(model) {
            Some(weights) => Stepper::Cpu(Box::new(weights)),
            None => Stepper::Generic(generic_projection(model, device)),
        };
        Batch {
            model,
            specials,
            device: device.clone(),
            state: None,
            slots: Vec::new(),
            stepper,
        }
    }

    /// Rows decoding (holes not counted).
    pub fn len(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds rows, each under a key the caller chooses (it comes back with every token).
    /// Their sources go through the encoder now, together; their first token comes with
    /// the next [`step`](Self::step).
    pub fn admit(&mut self, rows: Vec<(usize, Row)>) {
        if rows.is_empty() {
            return;
        }
        let max_len = self.model.max_len();
        let longest = self
            .slots
            .iter()
            .flatten()
            .map(|l| &l.row)
            .chain(rows.iter().map(|(_, r)| r))
            .map(|r| r.budget(max_len))
            .max()
            .unwrap_or(1);
        let srcs: Vec<&[u32]> = rows
            .iter()
            .map(|(_, r)| &r.src[..r.src.len().min(max_len)])
            .collect();
        let fresh = self.model.start(
            &srcs,
            self.specials.pad,
            capacity_for(longest, max_len),
            &self.device,
        );
        let mut incoming = rows.into_iter().map(|(key, row)| Live {
            key,
            rng: row.sampling.seed,
            row,
            out: Vec::new(),
            last: self.specials.bos,
        });
        let Some(state) = self.state.take() else {
            self.state = Some(fresh);
            self.slots = incoming.map(Some).collect();
            return;
        };
        let holes: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_none())
            .collect();
        let n = fresh.rows();
        let filled = holes.len().min(n);
        let (capacity, src) = (
            state.capacity().max(fresh.capacity()),
            state.src_len.max(fresh.src_len),
        );
        let state = state.widen(capacity, src);
        let state = state.fill(&holes[..filled], &fresh);
        let state = if filled < n {
            let rest: Vec<usize> = (filled..n).collect();
            state.append(fresh.retain(&rest, &self.device))
        } else {
            state
        };
        for &hole in &holes[..filled] {
            self.slots[hole] = incoming.next();
        }
        self.slots.extend(incoming.map(Some));
        self.state = Some(state);
    }

    /// One token for every row. `on_token(key, token)` sees each token as it is made and
    /// may stop that row; returns the rows that finished at this step (they have left).
    pub fn step(&mut self, mut on_token: impl FnMut(usize, Token) -> Next) -> Vec<Finished> {
        if self.slots.iter().any(Option::is_none) {
            let keep: Vec<usize> = (0..self.slots.len())
                .filter(|&i| self.slots[i].is_some())
                .collect();
            self.state = match keep.is_empty() {
                true => None,
                false => self.state.take().map(|s| s.retain(&keep, &self.device)),
            };
            self.slots.retain(Option::is_some);
        }
        let Some(state) = self.state.as_mut() else {
            return Vec::new();
        };
        let live: Vec<&Live> = self.slots.iter().flatten().collect();
        let tokens: Vec<u32> = live.iter().map(|l| l.last).collect();
        let positions: Vec<usize> = live.iter().map(|l| l.out.len()).collect();
        let max_len = self.model.max_len();
        let src_lens: Vec<usize> = live.iter().map(|l| l.row.src.len().min(max_len)).collect();
        let logits = match &self.stepper {
            Stepper::Cpu(weights) => {
                (self.model).step_cpu(weights, state, &tokens, &positions, &src_lens)
            }
            Stepper::Generic(projection) => {
                (self.model).step(state, &tokens, &positions, &src_lens, projection)
            }
        };
        let vocab = logits.dims()[1];
        let flat: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("float logits");
        let mut finished = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(live) = slot else { continue };
            let scores = &flat[i * vocab..(i + 1) * vocab];
            let (id, logprob) = pick(scores, &live.out, &live.row.sampling, &mut live.rng);
            let token = Token {
                id,
                logprob,
                index: live.out.len(),
            };
            live.out.push(id);
            live.last = id;
            let mut finish = match on_token(live.key, token) {
                Next::Stop(f) => Some(f),
                Next::Continue => None,
            };
            if finish.is_none() && id == self.specials.eos && !live.row.ignore_eos {
                finish = Some(Finish::EosToken);
            }
            if finish.is_none() && live.out.len() >= live.row.budget(max_len) {
                finish = Some(Finish::Length);
            }
            if let Some(f) = finish {
                if let Some(l) = slot.take() {
                    finished.push((l.key, l.out, f));
                }
            }
        }
        if self.slots.iter().all(Option::is_none) {
            self.state = None;
            self.slots.clear();
        }
        finished
    }
}

/// Generates for every row together. `on_token(row, token)` sees each token as it is made
/// and may stop that row; returns each row's tokens and why it finished.
pub fn generate<B: Backend>(
    model: &Seq2Seq<B>,
    specials: &Specials,
    rows: &[Row],
    device: &B::Device,
    mut on_token: impl FnMut(usize, Token) -> Next,
) -> Vec<(Vec<u32>, Finish)> {
    let mut out: Vec<(Vec<u32>, Finish)> =
        rows.iter().map(|_| (Vec::new(), Finish::Length)).collect();
    let mut batch = Batch::new(model, specials, device);
    batch.admit(rows.iter().cloned().enumerate().collect());
    while !batch.is_empty() {
        for (key, tokens, finish) in batch.step(&mut on_token) {
            out[key] = (tokens, finish);
        }
    }
    out
}

/// Greedy decoding that reruns the decoder over the whole prefix at every step: what
/// generation costs without a cache. Kept to measure the cache against.
pub fn generate_uncached<B: Backend>(
    model: &Seq2Seq<B>,
    specials: &Specials,
    src: &[u32],
    new_tokens: usize,
    device: &B::Device,
) -> Vec<u32> {
    // Cut to the position table, as the cached path cuts its rows.
    let src = &src[..src.len().min(model.max_len())];
    let (src, src_pad) = pad_sources::<B>(&[src], specials.pad, model.max_len(), device);
    let memory = model.encode(src, src_pad.clone());
    let mut prefix = vec![specials.bos as i64];
    let mut out = Vec::new();
    for _ in 0..new_tokens.min(model.max_len()) {
        let t = prefix.len();
        let tgt = Tensor::<B, 2, Int>::from_data(TensorData::new(prefix.clone(), [1, t]), device);
        let pad = Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![false; t], [1, t]), device);
        // Only the last position's logits are needed (as in the PyTorch reference's loop):
        // projecting every position would charge this baseline for work it need not do.
        let hidden = model.decode_hidden(tgt, pad, memory.clone(), src_pad.clone());
        let d = hidden.dims()[2];
        let logits = model.project(hidden.slice([0..1, t - 1..t, 0..d]));
        let vocab = logits.dims()[2];
        let last = logits
            .reshape([vocab])
            .argmax(0)
            .into_scalar()
            .elem::<i64>();
        out.push(last as u32);
        prefix.push(last);
    }
    out
}

/// log Σ exp(scores), computed stably.
fn log_sum_exp(scores: &[f32]) -> f32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = scores.iter().map(|s| (s - max).exp()).sum();
    max + sum.ln()
}

/// A token's log-probability: `score - log_z`, where +inf scores (weights gone bad) share
/// the whole probability, each `-ln(n)` for `n` of them, and every other token is
/// impossible; as `score - log_z` those were NaN (`log_z` is NaN then: inf - inf), which
/// JSON writes as null.
fn log_probability(scores: &[f32], id: usize, log_z: f32) -> f32 {
    let certain = scores.iter().filter(|&&x| x == f32::INFINITY).count();
    match (certain, scores[id] == f32::INFINITY) {
        (0, _) => scores[id] - log_z,
        (_, true) => -(certain as f32).ln(),
        (_, false) => f32::NEG_INFINITY,
    }
}

/// The next token of one row and its log-probability under the model.
fn pick(scores: &[f32], generated: &[u32], s: &Sampling, rng: &mut u64) -> (u32, f32) {
    // A NaN score (weights gone bad) is no candidate: as -inf it has probability 0 in the
    // greedy path and the sampled one alike, and leaves the log-probabilities numbers.
    let cleaned: Vec<f32>;
    let scores = if scores.iter().any(|x| x.is_nan()) {
        cleaned = scores
            .iter()
            .map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x })
            .collect();
        &cleaned[..]
    } else {
        scores
    };
    let log_z = log_sum_exp(scores);
    let penalized: Vec<f32>;
    let view = match s.repetition_penalty.filter(|p| *p != 1.0) {
        Some(penalty) if !generated.is_empty() => {
            let mut v = scores.to_vec();
            // Once per distinct token, however often it occurred (as TGI and transformers
            // do): compounding per occurrence would push a token seen n times by penalty^n.
            let mut seen = std::collections::HashSet::new();
            for &t in generated.iter().filter(|&&t| seen.insert(t)) {
                let x = &mut v[t as usize];
                *x = if *x > 0.0 { *x / penalty } else { *x * penalty };
            }
            penalized = v;
            &penalized[..]
        }
        _ => scores,
    };
    let id = if s.is_greedy() {
        argmax(view)
    } else {
        sample(view, s, rng)
    };
    (id as u32, log_probability(scores, id, log_z))
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Temperature, then top-k, then top-p (nucleus), then typical-p (transformers' and TGI's
/// order), then a draw from a generator whose whole state is one number per row: the same
/// seed gives the same text.
fn sample(scores: &[f32], s: &Sampling, rng: &mut u64) -> usize {
    let mut cand: Vec<(usize, f32)> = scores.iter().copied().enumerate().collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if let Some(k) = s.top_k.filter(|k| *k > 0) {
        cand.truncate(k);
    }
    // The best score is subtracted before dividing by the temperature, not after: every
    // scaled score is then ≤ 0 (at worst -inf, a probability of 0), never inf - inf = NaN.
    let max = cand[0].1;
    if max == f32::INFINITY {
        // Certain, as greedy decoding has it; inf - inf would make every probability NaN.
        return cand[0].0;
    }
    let mut probs: Vec<f32> = cand
        .iter()
        .map(|c| ((c.1 - max) / s.temperature).exp())
        .collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = s.top_p.filter(|p| *p > 0.0 && *p < 1.0) {
        let mut acc = 0.0;
        let mut n = 0;
        for p in &probs {
            acc += p;
            n += 1;
            if acc >= top_p {
                break;
            }
        }
        probs.truncate(n);
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    if let Some(mass) = s.typical_p.filter(|p| *p > 0.0 && *p < 1.0) {
        let kept = typical(&probs, mass);
        let (c, p): (Vec<(usize, f32)>, Vec<f32>) =
            kept.into_iter().map(|i| (cand[i], probs[i])).unzip();
        let total: f32 = p.iter().sum();
        probs = p.into_iter().map(|x| x / total).collect();
        cand = c;
    }
    *rng = crate::data::mix(*rng);
    let u = (*rng >> 40) as f32 / (1u64 << 24) as f32;
    cand[draw(&probs, u)].0
}

/// The indices of `probs` (a distribution) that locally typical sampling keeps: ordered by
/// how far each one's surprise (-ln p) is from the entropy, as many as reach `mass`, the one
/// that crosses it included (at least one). Ties keep their order.
fn typical(probs: &[f32], mass: f32) -> Vec<usize> {
    let entropy: f32 = probs
        .iter()
        .filter(|p| **p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    let mut order: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
    order.sort_by(|&a, &b| {
        let far = |i: usize| (-probs[i].ln() - entropy).abs();
        far(a).total_cmp(&far(b)).then(a.cmp(&b))
    });
    let mut acc = 0.0;
    let mut n = 0;
    for &i in &order {
        acc += probs[i];
        n += 1;
        if acc >= mass {
            break;
        }
    }
    order.truncate(n.max(1));
    order
}

/// The index whose share of [0, 1) holds `u`. Where the probabilities' sum falls short of
/// `u` by rounding (1 - 3e-6, say), the last one with any probability, never one with none.
fn draw(probs: &[f32], u: f32) -> usize {
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return i;
        }
    }
    probs.iter().rposition(|&p| p > 0.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use burn::backend::Flex;

    fn tiny() -> (Seq2Seq<Flex>, Specials) {
        let specials = Specials::minimal();
        (tiny_config().init_seeded(7, &Default::default()), specials)
    }

    fn tiny_config() -> ModelConfig {
        ModelConfig {
            vocab_size: 40,
            d_model: 32,
            n_heads: 4,
            enc_layers: 2,
            dec_layers: 2,
            d_ff: 64,
            max_len: 32,
            dropout: 0.0,
            activation: crate::model::Activation::Relu,
        }
    }

    fn greedy(src: Vec<u32>, n: usize) -> Row {
        Row {
            src,
            sampling: Sampling::default(),
            max_new_tokens: n,
            ignore_eos: true,
        }
    }

    #[test]
    fn cached_decoding_matches_recomputing_the_prefix() {
        let (model, sp) = tiny();
        let device = Default::default();
        let src = vec![5, 6, 7, 8, 9];
        let cached = generate(&model, &sp, &[greedy(src.clone(), 20)], &device, |_, _| {
            Next::Continue
        });
        let uncached = generate_uncached(&model, &sp, &src, 20, &device);
        assert_eq!(cached[0].0, uncached);
        assert_eq!(cached[0].1, Finish::Length);
    }

    #[test]
    fn a_batch_of_different_prompts_decodes_like_each_alone() {
        let (model, sp) = tiny();
        let device = Default::default();
        let rows = vec![
            greedy(vec![5, 6], 12),
            greedy(
                vec![
                    9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
                ],
                7,
            ),
            greedy(vec![30], 12),
        ];
        let together = generate(&model, &sp, &rows, &device, |_, _| Next::Continue);
        for (i, row) in rows.iter().enumerate() {
            let alone = generate(&model, &sp, std::slice::from_ref(row), &device, |_, _| {
                Next::Continue
            });
            assert_eq!(together[i].0, alone[0].0, "row {i}");
        }
        assert_eq!(together[1].0.len(), 7);
    }

    /// Rows join a running batch at different steps: appended (with a longer source and
    /// budget than the row in it, so the buffers widen) and into holes finished rows left.
    fn rows_join_a_running_batch_and_decode_like_each_alone<B: Backend>(model: &Seq2Seq<B>) {
        let sp = Specials::minimal();
        let device = model.embed.weight.device();
        let rows = [
            greedy(vec![5, 6], 9),
            // Longer source and budget than the running row: the batch widens both.
            greedy((9..28).collect(), 20),
            greedy(vec![30, 31, 32], 4),
            // Joins into the hole row 4 left.
            greedy(vec![7, 8, 9, 10], 6),
            // Joins at the step after rows 0 and 2 finished, into row 0's hole; row 2's
            // hole is closed up. Its source is cut to the position table (32).
            greedy((1..40).collect(), 5),
        ];
        let joins = [(0, 0), (3, 1), (5, 2), (9, 4), (14, 3)];
        let mut batch = Batch::new(model, &sp, &device);
        let mut got: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
        let mut finished = Vec::new();
        for step in 0..40 {
            for &(_, r) in joins.iter().filter(|j| j.0 == step) {
                batch.admit(vec![(r, rows[r].clone())]);
            }
            if step == 9 {
                assert_eq!(batch.len(), 2); // rows 1 and 4
            }
            finished.extend(batch.step(|key, token| {
                got[key].push(token.id);
                Next::Continue
            }));
        }
        assert!(batch.is_empty());
        assert_eq!(finished.len(), rows.len());
        for (key, row) in rows.iter().enumerate() {
            let alone = generate(model, &sp, std::slice::from_ref(row), &device, |_, _| {
                Next::Continue
            });
            assert_eq!(got[key], alone[0].0, "row {key}");
            let (_, tokens, finish) = finished.iter().find(|f| f.0 == key).unwrap();
            assert_eq!(tokens, &alone[0].0);
            assert_eq!(*finish, Finish::Length);
        }
    }

    #[test]
    fn rows_that_join_a_running_batch_decode_like_each_alone() {
        rows_join_a_running_batch_and_decode_like_each_alone(&tiny().0);
    }

    #[test]
    fn rows_that_join_decode_like_each_alone_through_the_generic_writes() {
        // The autodiff backend's tensors are not the CPU backend's, so the key/value writes
        // take the portable `slice_assign` path that GPU backends use.
        use burn::backend::Autodiff;
        use burn::module::AutodiffModule;
        let model = Seq2Seq::<Autodiff<Flex>>::from_inner(tiny().0);
        rows_join_a_running_batch_and_decode_like_each_alone(&model);
    }

    #[test]
    fn the_cpu_step_decodes_like_burns_operations() {
        // On the autodiff backend (not flex itself) a batch takes the generic step.
        use burn::backend::Autodiff;
        use burn::module::AutodiffModule;
        let (model, sp) = tiny();
        let generic = Seq2Seq::<Autodiff<Flex>>::from_inner(model.clone());
        let rows: Vec<Row> = [
            vec![5, 6, 7, 8, 9],
            vec![11, 3],
            vec![20, 21, 22, 23, 24, 25, 26],
        ]
        .into_iter()
        .map(|src| greedy(src, 20))
        .collect();
        let device = Default::default();
        let ours = generate(&model, &sp, &rows, &device, |_, _| Next::Continue);
        let burns = generate(&generic, &sp, &rows, &device, |_, _| Next::Continue);
        assert!(decode_cpu::Weights::of(&model).is_some());
        assert!(decode_cpu::Weights::of(&generic).is_none());
        assert_eq!(ours, burns);
    }

    /// GPU backends' decoding (the generic step, cache writes, the projection's copy) on a
    /// real CubeCL backend: burn's wgpu one, on whatever Vulkan device the machine has (in
    /// CI, Mesa's lavapipe). Greedy tokens as the CPU's, log-probabilities within rounding.
    #[cfg(feature = "wgpu")]
    #[test]
    fn a_cubecl_backend_decodes_like_the_cpu() {
        use burn::backend::wgpu::{Wgpu, WgpuDevice};
        let (model, sp) = tiny();
        let device = WgpuDevice::default();
        let gpu = crate::weights::import(
            tiny_config().init::<Wgpu>(&device),
            &crate::weights::export(&model),
        )
        .expect("the same shapes");
        let rows: Vec<Row> = [vec![5, 6, 7, 8, 9], vec![11, 3]]
            .into_iter()
            .map(|src| greedy(src, 12))
            .collect();
        let mut logprobs = [Vec::new(), Vec::new()];
        let on_cpu = generate(&model, &sp, &rows, &Default::default(), |_, t| {
            logprobs[0].push(t.logprob);
            Next::Continue
        });
        let on_gpu = generate(&gpu, &sp, &rows, &device, |_, t| {
            logprobs[1].push(t.logprob);
            Next::Continue
        });
        assert_eq!(on_cpu, on_gpu);
        for (a, b) in logprobs[0].iter().zip(&logprobs[1]) {
            assert!((a - b).abs() < 1e-3, "{logprobs:?}");
        }
    }

    #[test]
    fn a_prompt_longer_than_the_position_table_is_cut_to_it() {
        // 24 positions, not a multiple of the sources' padding (16): a 30-token prompt is
        // cut to 24 and padded no further, on the CPU step, the generic one and the
        // uncached loop alike.
        use burn::backend::Autodiff;
        use burn::module::AutodiffModule;
        let model: Seq2Seq<Flex> = ModelConfig {
            max_len: 24,
            ..tiny_config()
        }
        .init(&Default::default());
        let generic = Seq2Seq::<Autodiff<Flex>>::from_inner(model.clone());
        let sp = Specials::minimal();
        let src: Vec<u32> = (0..30).map(|i| 5 + i % 30).collect();
        let device = Default::default();
        let rows = [greedy(src.clone(), 8)];
        let cached = generate(&model, &sp, &rows, &device, |_, _| Next::Continue);
        let through_burn = generate(&generic, &sp, &rows, &device, |_, _| Next::Continue);
        let uncached = generate_uncached(&model, &sp, &src, 8, &device);
        assert_eq!(cached, through_burn);
        assert_eq!(cached[0].0, uncached);
    }

    #[test]
    fn sampling_is_reproducible_with_a_seed_and_stops_when_told() {
        let (model, sp) = tiny();
        let device = Default::default();
        let row = |seed| Row {
            src: vec![5, 6, 7],
            sampling: Sampling {
                temperature: 1.5,
                top_k: Some(20),
                top_p: Some(0.9),
                typical_p: Some(0.95),
                repetition_penalty: Some(1.3),
                seed,
            },
            max_new_tokens: 16,
            ignore_eos: true,
        };
        let run = |seed| generate(&model, &sp, &[row(seed)], &device, |_, _| Next::Continue);
        assert_eq!(run(1)[0].0, run(1)[0].0);
        assert!((0..5).any(|s| run(s + 2)[0].0 != run(1)[0].0));
        let stopped = generate(&model, &sp, &[row(1)], &device, |_, t| {
            if t.index == 3 {
                Next::Stop(Finish::StopSequence)
            } else {
                Next::Continue
            }
        });
        assert_eq!(stopped[0].0.len(), 4);
        assert_eq!(stopped[0].1, Finish::StopSequence);
    }

    #[test]
    fn the_repetition_penalty_counts_each_token_once() {
        // Penalised once, token 0 (2.0 / 1.5 = 1.33) still beats token 1 (1.2); penalised
        // per occurrence it would fall to 0.89 and lose.
        let s = Sampling {
            repetition_penalty: Some(1.5),
            ..Sampling::default()
        };
        let scores = [2.0, 1.2, -1.0];
        assert_eq!(pick(&scores, &[0, 0, 0], &s, &mut 0).0, 0);
        // A negative score is multiplied, also once: -0.5 * 1.5 = -0.75 beats -1.0.
        let scores = [-1.0, -0.5];
        assert_eq!(pick(&scores, &[1, 1, 1, 1], &s, &mut 0).0, 1);
    }

    /// Probabilities 0.5, 0.2, 0.2, 0.1 have entropy 1.22 nats; the two 0.2s (surprise
    /// 1.61) are nearest it, then 0.5 (0.69). A mass of 0.3 keeps those two alone: the
    /// likeliest token is never drawn.
    #[test]
    fn typical_sampling_keeps_the_tokens_nearest_the_entropy() {
        let probs = [0.5f32, 0.2, 0.2, 0.1];
        assert_eq!(typical(&probs, 0.3), [1, 2]);
        assert_eq!(typical(&probs, 0.5), [1, 2, 0]);
        assert_eq!(typical(&probs, 1e-6), [1]);
        let scores: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let s = Sampling {
            temperature: 1.0,
            typical_p: Some(0.3),
            ..Sampling::default()
        };
        let drawn: std::collections::BTreeSet<usize> = (0..200u64)
            .map(|seed| sample(&scores, &s, &mut { seed }))
            .collect();
        assert_eq!(drawn.into_iter().collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn a_tiny_temperature_picks_the_likeliest_token() {
        let scores = [0.5, 3.0, 1.0, -2.0];
        for temperature in [1e-45, 1e-30, 1e-5, 0.0, f32::NAN] {
            let s = Sampling {
                temperature,
                seed: 9,
                ..Sampling::default()
            };
            assert!(s.is_greedy(), "{temperature}");
            assert_eq!(pick(&scores, &[], &s, &mut 9).0, 1, "{temperature}");
        }
        // Sampling itself never sees inf - inf, whatever the temperature it is given.
        let s = Sampling {
            temperature: 1e-45,
            ..Sampling::default()
        };
        for seed in 0..20 {
            assert_eq!(sample(&scores, &s, &mut { seed }), 1);
        }
        assert!(!Sampling {
            temperature: MIN_TEMPERATURE,
            ..Sampling::default()
        }
        .is_greedy());
    }

    #[test]
    fn broken_scores_and_a_draw_past_the_sum_pick_a_possible_token() {
        let sampled = Sampling {
            temperature: 1.0,
            seed: 3,
            ..Sampling::default()
        };
        // +inf is certain and NaN impossible, sampled or greedy, with finite logprobs.
        let scores = [0.5, f32::NAN, f32::INFINITY, 1.0];
        for s in [&sampled, &Sampling::default()] {
            for seed in 0..20 {
                let (id, logprob) = pick(&scores, &[], s, &mut { seed });
                assert_eq!((id, logprob), (2, 0.0));
            }
        }
        // Two certain tokens share the probability: ln(1/2) each, the others impossible.
        let two = [f32::INFINITY, 0.0, f32::INFINITY];
        assert_eq!(log_probability(&two, 2, log_sum_exp(&two)), -(2f32.ln()));
        assert_eq!(
            log_probability(&two, 1, log_sum_exp(&two)),
            f32::NEG_INFINITY
        );
        let (id, logprob) = pick(&[0.5, f32::NAN, 3.0], &[], &Sampling::default(), &mut 0);
        assert_eq!(id, 2);
        assert!(logprob.is_finite() && logprob < 0.0, "{logprob}");
        // A token of probability 0 is never drawn, not even by a draw at the very top of
        // [0, 1) above a sum that rounding left short of 1.
        let top = 1.0 - 1.0 / (1u64 << 24) as f32;
        assert_eq!(draw(&[0.6, 0.399_999, 0.0], top), 1);
        assert_eq!(draw(&[0.6, 0.4, 0.0], 0.7), 1);
        assert_eq!(draw(&[0.0, 0.0], top), 0);
    }

    #[test]
    fn int8_weight_matrices_generate_like_f32() {
        let (model, sp) = tiny();
        let device = Default::default();
        let q = crate::weights::keep_int8(model.clone(), 32).unwrap();
        let src = vec![5, 6, 7, 8, 9];
        let a = generate(&model, &sp, &[greedy(src.clone(), 10)], &device, |_, _| {
            Next::Continue
        });
        let b = generate(&q, &sp, &[greedy(src.clone(), 10)], &device, |_, _| {
            Next::Continue
        });
        assert_eq!(b[0].0.len(), 10);
        // A random tiny model's logits are nearly flat, so int8 rounding may change a later
        // token: against f32, only the first is compared.
        assert_eq!(a[0].0[0], b[0].0[0]);

        // Against the f32 model holding exactly the values the int8 blocks stand for, the
        // int8 model computes the same logits up to f32 rounding, and generates the same
        // tokens: no product may round them again (flex's transpose of a block-quantized
        // matrix re-quantizes it along its other axis, which this caught in the projection).
        let exact = q.clone().map(&mut Dequantize);
        let logits = |m: &Seq2Seq<Flex>| {
            let s = Tensor::<Flex, 1, Int>::from_ints(&src[..], &device).reshape([1, 5]);
            let t =
                Tensor::<Flex, 1, Int>::from_ints([1, 9, 4, 22, 3, 17], &device).reshape([1, 6]);
            let (s_pad, t_pad) = (s.clone().equal_elem(-1), t.clone().equal_elem(-1));
            let memory = m.encode(s, s_pad.clone());
            m.decode(t, t_pad, memory, s_pad)
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        let (want, got) = (logits(&exact), logits(&q));
        let worst = want
            .iter()
            .zip(&got)
            .map(|(w, g)| (w - g).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "int8 logits differ by {worst}");
        let c = generate(&exact, &sp, &[greedy(src, 10)], &device, |_, _| {
            Next::Continue
        });
        assert_eq!(b[0].0, c[0].0);
    }

    /// Every quantized parameter back to f32, value for value.
    struct Dequantize;

    impl burn::module::ModuleMapper<Flex> for Dequantize {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<Flex, D>>,
        ) -> burn::module::Param<Tensor<Flex, D>> {
            let (id, tensor, mapper) = param.consume();
            let tensor = match tensor.dtype() {
                burn::tensor::DType::QFloat(_) => tensor.dequantize(),
                _ => tensor,
            };
            burn::module::Param::from_mapped_value(id, tensor, mapper)
        }
    }
}
