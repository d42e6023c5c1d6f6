//! Operations that burn's autodiff backend splits into several, given one step of their own
//! on the CPU (burn 0.21 lets a model generic over `Backend` register no backward step of
//! its own for one backend, so each is recognised by type and moved to the concrete
//! `Autodiff<Flex>` tensor through `Any`):
//! - multi-head attention's core: per (batch, head), the products through strides over the
//!   heads as the projections lay them out (burn's composition copies them into
//!   `[batch, heads, time, dk]` and back, which burn-flex does element by element), the
//!   scale, mask bias, softmax and dropout on the scores while they are in cache; burn's
//!   autodiff composes a softmax of five operations, each a pass of its own.
//! - the products of linear layers and of the output projection, with the bias as the
//!   product's starting value and outputs in buffers of their own (burn-flex allocates each
//!   product's output as bytes and copies it into an aligned buffer).
//! - the loss: a log-softmax over the vocabulary (8,000 values per target token, the
//!   largest tensors of a step) followed by a gather is, under autodiff, a dozen passes
//!   over the logits; here one step computes each token's cross-entropy from its row's
//!   log-sum-exp, and its backward writes `softmax - target distribution` in one pass.
//! - layer normalisation (22 per step for `mini`), nine operations under autodiff, is one
//!   step with the textbook backward.
//! - dropout, with a mask made from a hash of each value's index where it is applied,
//!   forward and backward, and never stored.
//!
//! Other backends (CUDA, where burn fuses element-wise work itself) keep burn's operations.

use std::any::{Any, TypeId};
use std::sync::Arc;

use rayon::prelude::*;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorPrimitive};
use burn_flex::FlexTensor;

use crate::rowmath;

/// burn-autodiff's float tensor (its type is not exported by name).
type AutodiffTensor = FloatTensor<Autodiff<Flex>>;

/// Multi-head attention's core, `context = dropout(softmax(q k^T / root + bias)) v` for
/// every head, as one step on the CPU. `q` `[batch, query, d]`, `k` and `v` `[batch, key,
/// d]` are the projections as the linear layers write them (heads side by side in `d`);
/// `bias` `[batch or 1, 1, query or 1, key]`; `keep` the dropout's mask (None: no dropout),
/// asked for only on the fused path. Each (batch, head) pair is one task: its products read
/// and write the heads in place through strides (burn's composition copies every head
/// split into `[batch, heads, time, dk]` and back, forward and backward), and its scores
/// are softmaxed while they are in cache. Backward, from the saved softmax:
/// `dP = G V^T`, `dZ = y * (dP * mask - sum(dP * mask * y)) / root`, `dQ = dZ K`,
/// `dK = dZ^T Q`, `dV = P^T G`. `Err` gives the inputs back where the step does not apply
/// (another backend, not f32); the caller then composes burn's operations.
#[allow(clippy::type_complexity)]
pub fn attention<B: Backend>(
    [q, k, v]: [Tensor<B, 3>; 3],
    heads: usize,
    root: f32,
    bias: &Tensor<B, 4>,
    keep: impl FnOnce() -> Option<KeepMask>,
) -> Result<Tensor<B, 3>, [Tensor<B, 3>; 3]> {
    let Some(path) = path::<B>() else {
        return Err([q, k, v]);
    };
    let [b, t, d] = q.dims();
    let [kb, s, kd] = k.dims();
    let [bb, one, bt, bs] = bias.dims();
    let fits = b > 0
        && t > 0
        && s > 0
        && heads > 0
        && kb == b
        && kd == d
        && v.dims() == [b, s, d]
        && d % heads == 0
        && (bb == b || bb == 1)
        && one == 1
        && (bt == t || bt == 1)
        && bs == s;
    let f32s = [q.dtype(), k.dtype(), v.dtype(), bias.dtype()]
        .iter()
        .all(|&dtype| dtype == DType::F32);
    if !fits || !f32s {
        return Err([q, k, v]);
    }
    let geometry = Heads {
        batch: b,
        heads,
        query: t,
        key: s,
        dk: d / heads,
        root,
        bias_per_batch: bb > 1,
        bias_per_query: bt > 1,
    };
    Ok(match path {
        Path::Forward => {
            let [q, k, v] = [q, k, v].map(|x| to_concrete::<B, FlexTensor, 3>(x).to_contiguous());
            let bias: FlexTensor = to_concrete(bias.clone());
            let saved = geometry.forward([&q, &k, &v], &bias.to_contiguous(), None);
            from_concrete(saved.context)
        }
        Path::Autodiff { balanced } => {
            let inputs = [q, k, v].map(to_concrete::<B, AutodiffTensor, 3>);
            let bias: AutodiffTensor = to_concrete(bias.clone());
            let bias = bias.primitive.to_contiguous();
            let mask = keep();
            let out = if balanced {
                fused_attention::<BalancedCheckpointing>(inputs, &bias, mask, geometry)
            } else {
                fused_attention::<NoCheckpointing>(inputs, &bias, mask, geometry)
            };
            from_concrete(out)
        }
    })
}

/// The shapes of one attention: `batch * heads` independent products.
#[derive(Clone, Copy, Debug)]
struct Heads {
    batch: usize,
    heads: usize,
    query: usize,
    key: usize,
    dk: usize,
    root: f32,
    /// The bias has a row per batch row / per query position (else one, broadcast).
    bias_per_batch: bool,
    bias_per_query: bool,
}

/// What the forward pass computes and the backward pass needs.
struct Attended {
    context: FlexTensor,
    /// The softmax, `[batch, heads, query, key]`.
    y: Vec<f32>,
    /// The weights applied to `v` (`y` times the dropout mask); None when there is no mask.
    p: Option<Vec<f32>>,
}

/// A base pointer shared by the tasks of one step, each of which writes only its own part:
/// its (batch, head) slice of the scores, or its head's columns of its batch row.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: the tasks given one `Shared` write disjoint elements (see its uses).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The address `offset` values on (through a method, so closures capture the whole
    /// `Shared`, not its raw pointer).
    ///
    /// # Safety
    /// `offset` lies inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller's promise.
        unsafe { self.0.add(offset) }
    }
}

impl Heads {
    /// The bias row added to query `ti`'s scores in batch row `bi`.
    fn bias_row(&self, bi: usize, ti: usize) -> usize {
        let batch = if self.bias_per_batch { bi } else { 0 };
        if self.bias_per_query {
            batch * self.query + ti
        } else {
            batch
        }
    }

    fn d(&self) -> usize {
        self.heads * self.dk
    }

    /// Head `hh` of batch row `bi` of a `[batch, len, d]` tensor: `len` rows of `dk`.
    fn head<'a>(&self, x: &'a [f32], len: usize, bi: usize, hh: usize) -> Operand<'a> {
        Operand {
            values: &x[bi * len * self.d() + hh * self.dk..],
            rs: self.d() as isize,
            cs: 1,
        }
    }

    /// `dst`'s head `hh` of batch row `bi` (`len` rows of `dk`, row stride `d`) `= lhs · rhs`.
    ///
    /// # Safety
    /// `dst` is a `[batch, len, d]` buffer, and no other task writes this (bi, hh) head.
    unsafe fn product_into_head(
        &self,
        dst: Shared,
        len: usize,
        (bi, hh): (usize, usize),
        inner: usize,
        lhs: Operand,
        rhs: Operand,
    ) {
        lhs.check(len, inner);
        rhs.check(inner, self.dk);
        let offset = bi * len * self.d() + hh * self.dk;
        let shape = [len, inner, self.dk];
        // SAFETY: the head's elements lie inside the buffer; the caller owns them alone.
        unsafe {
            gemm_raw(
                dst.at(offset),
                self.d(),
                false,
                shape,
                lhs,
                rhs,
                gemm::Parallelism::None,
            );
        }
    }

    fn forward(
        &self,
        [q, k, v]: [&FlexTensor; 3],
        bias: &FlexTensor,
        mask: Option<KeepMask>,
    ) -> Attended {
        let (t, s, d) = (self.query, self.key, self.d());
        let (qs, ks, vs) = (q.storage::<f32>(), k.storage::<f32>(), v.storage::<f32>());
        let bias = bias.storage::<f32>();
        let (slices, area) = (self.batch * self.heads, t * s);
        // Every value of these is written below, once, by the task of its (batch, head).
        let mut y: Vec<f32> = Vec::with_capacity(slices * area);
        let mut p: Option<Vec<f32>> = mask.map(|_| Vec::with_capacity(slices * area));
        let mut context: Vec<f32> = Vec::with_capacity(self.batch * t * d);
        let (ys, ps) = (
            Shared(y.as_mut_ptr()),
            p.as_mut().map(|p| Shared(p.as_mut_ptr())),
        );
        let out = Shared(context.as_mut_ptr());
        (0..slices).into_par_iter().for_each(|slice| {
            let (bi, hh) = (slice / self.heads, slice % self.heads);
            let qh = self.head(qs, t, bi, hh);
            let kh = self.head(ks, s, bi, hh);
            // SAFETY: this task alone touches slice `slice` of `y`, written whole here
            // before it is read.
            let scores = unsafe {
                let at = ys.at(slice * area);
                let shape = [t, self.dk, s];
                gemm_raw(
                    at,
                    s,
                    false,
                    shape,
                    qh,
                    kh.transpose(),
                    gemm::Parallelism::None,
                );
                std::slice::from_raw_parts_mut(at, area)
            };
            for (ti, row) in scores.chunks_mut(s).enumerate() {
                let add = &bias[self.bias_row(bi, ti) * s..][..s];
                rowmath::softmax(row, add, 1.0 / self.root);
            }
            let weights: &[f32] = match (ps, mask) {
                // SAFETY: as for `y`, this task's slice of `p`, written whole first.
                (Some(ps), Some(mask)) => unsafe {
                    let at = ps.at(slice * area);
                    std::ptr::copy_nonoverlapping(scores.as_ptr(), at, area);
                    let dropped = std::slice::from_raw_parts_mut(at, area);
                    mask.apply_from(slice * area, dropped);
                    dropped
                },
                _ => scores,
            };
            let pw = Operand {
                values: weights,
                rs: s as isize,
                cs: 1,
            };
            let vh = self.head(vs, s, bi, hh);
            // SAFETY: this task alone writes head (bi, hh) of the context.
            unsafe { self.product_into_head(out, t, (bi, hh), s, pw, vh) };
        });
        // SAFETY: every slice of `y` and `p`, and every head of the context, was written.
        unsafe {
            y.set_len(slices * area);
            context.set_len(self.batch * t * d);
            if let Some(p) = &mut p {
                p.set_len(slices * area);
            }
        }
        let context = FlexTensor::from_data(TensorData::new(context, [self.batch, t, d]));
        Attended { context, y, p }
    }
}

#[derive(Clone, Debug)]
struct AttentionState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    y: Arc<Vec<f32>>,
    p: Option<Arc<Vec<f32>>>,
    mask: Option<KeepMask>,
    geometry: Heads,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [q_node, k_node, v_node] = ops.parents;
        let g = grads.consume::<Flex>(&ops.node).to_contiguous();
        let st = ops.state;
        let h = st.geometry;
        let (t, s, d) = (h.query, h.key, h.d());
        let (qs, ks, vs, gs) = (
            st.q.storage::<f32>(),
            st.k.storage::<f32>(),
            st.v.storage::<f32>(),
            g.storage::<f32>(),
        );
        let p = st.p.as_deref().unwrap_or(&st.y);
        // Every head of these is written below, once, by its task.
        let mut dq: Vec<f32> = Vec::with_capacity(h.batch * t * d);
        let mut dk: Vec<f32> = Vec::with_capacity(h.batch * s * d);
        let mut dv: Vec<f32> = Vec::with_capacity(h.batch * s * d);
        let (dq_out, dk_out, dv_out) = (
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        );
        (0..h.batch * h.heads).into_par_iter().for_each_init(
            || vec![0f32; t * s],
            |dz, slice| {
                let (bi, hh) = (slice / h.heads, slice % h.heads);
                let at = slice * t * s;
                let (y, p) = (&st.y[at..][..t * s], &p[at..][..t * s]);
                let gh = h.head(gs, t, bi, hh);
                let (qh, kh, vh) = (
                    h.head(qs, t, bi, hh),
                    h.head(ks, s, bi, hh),
                    h.head(vs, s, bi, hh),
                );
                // dV = P^T G
                let pt = Operand {
                    values: p,
                    rs: 1,
                    cs: s as isize,
                };
                // SAFETY: each task writes only its own (bi, hh) head of dq, dk and dv.
                unsafe { h.product_into_head(dv_out, s, (bi, hh), t, pt, gh) };
                // dP = G V^T, then the softmax's (and dropout's, and scale's) backward.
                gemm_into(dz, false, [t, h.dk, s], gh, vh.transpose());
                if let Some(mask) = st.mask {
                    mask.apply_from(at, dz);
                }
                let scale = 1.0 / h.root;
                for (g, y) in dz.chunks_mut(s).zip(y.chunks(s)) {
                    let dot = rowmath::dot(g, y);
                    for (g, &y) in g.iter_mut().zip(y) {
                        *g = y * (*g - dot) * scale;
                    }
                }
                let z = Operand {
                    values: dz,
                    rs: s as isize,
                    cs: 1,
                };
                unsafe {
                    h.product_into_head(dq_out, t, (bi, hh), s, z, kh);
                    h.product_into_head(dk_out, s, (bi, hh), t, z.transpose(), qh);
                }
            },
        );
        // SAFETY: the (batch, head) tasks wrote every head of the three.
        unsafe {
            dq.set_len(h.batch * t * d);
            dk.set_len(h.batch * s * d);
            dv.set_len(h.batch * s * d);
        }
        for (node, grad, len) in [(q_node, dq, t), (k_node, dk, s), (v_node, dv, s)] {
            if let Some(node) = node {
                let grad = FlexTensor::from_data(TensorData::new(grad, [h.batch, len, d]));
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

fn fused_attention<C: CheckpointStrategy>(
    [q, k, v]: [AutodiffTensor; 3],
    bias: &FlexTensor,
    mask: Option<KeepMask>,
    geometry: Heads,
) -> AutodiffTensor {
    let (qc, kc, vc) = (
        q.primitive.to_contiguous(),
        k.primitive.to_contiguous(),
        v.primitive.to_contiguous(),
    );
    let Attended { context, y, p } = geometry.forward([&qc, &kc, &vc], bias, mask);
    // Compute-bound: the softmax is kept for the backward pass rather than recomputed, under
    // gradient checkpointing too (it is the state).
    let prep = AttentionBackward
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful();
    match prep {
        OpsKind::Tracked(prep) => {
            let state = AttentionState {
                q: qc,
                k: kc,
                v: vc,
                y: Arc::new(y),
                p: p.map(Arc::new),
                mask,
                geometry,
            };
            prep.finish(state, context)
        }
        OpsKind::UnTracked(prep) => prep.finish(context),
    }
}

/// Dropout's keep mask, made where it is used instead of stored: value `i` is kept (and
/// scaled by `1 / keep`) when a hash of `i` and the key falls below `keep * 2^32`. The
/// forward and backward passes make the same mask from the key; nothing of the size of the
/// tensor is drawn, written or kept between them. The same values whatever the thread count.
#[derive(Clone, Copy, Debug)]
pub struct KeepMask {
    keys: [u32; 2],
    below: u32,
    scale: f32,
}

impl KeepMask {
    /// A mask keeping the share `keep` (in (0, 1)) of the values, for `key`.
    pub fn new(key: u64, keep: f64) -> Self {
        Self {
            keys: [key as u32, (key >> 32) as u32],
            below: (keep.clamp(0.0, 1.0) * 4_294_967_296.0).min(4_294_967_295.0) as u32,
            scale: (1.0 / keep) as f32,
        }
    }

    /// Value `i`'s factor: `1 / keep` or 0.
    #[inline(always)]
    fn at(&self, i: usize) -> f32 {
        // Two rounds of a 32-bit integer hash (a bijection), keyed between them; plain u32
        // arithmetic, so the loops over it vectorise.
        let round = |mut x: u32| {
            x ^= x >> 16;
            x = x.wrapping_mul(0x7feb_352d);
            x ^= x >> 15;
            x = x.wrapping_mul(0x846c_a68b);
            x ^ (x >> 16)
        };
        if round(round(i as u32 ^ self.keys[0]) ^ self.keys[1]) < self.below {
            self.scale
        } else {
            0.0
        }
    }

    /// `values[i] *= factor(i)`, on every core.
    fn apply(&self, values: &mut [f32]) {
        const CHUNK: usize = 1 << 14;
        values
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (j, v) in chunk.iter_mut().enumerate() {
                    *v *= self.at(c * CHUNK + j);
                }
            });
    }

    /// `values[j] *= factor(offset + j)`, on this thread.
    fn apply_from(&self, offset: usize, values: &mut [f32]) {
        for (j, v) in values.iter_mut().enumerate() {
            *v *= self.at(offset + j);
        }
    }

    /// The mask itself, for tests and for backends that multiply by a tensor.
    pub fn values(&self, n: usize) -> Vec<f32> {
        let mut values = vec![1.0; n];
        self.apply(&mut values);
        values
    }
}

/// Dropout with `mask` as one step: the input times the mask, forward and backward.
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, mask: KeepMask) -> Tensor<B, D> {
    let multiply = |x: Tensor<B, D>| {
        let (shape, device) = (x.shape(), x.device());
        let values = mask.values(shape.num_elements());
        x * Tensor::<B, D>::from_data(TensorData::new(values, shape), &device)
    };
    let Some(Path::Autodiff { balanced }) = path::<B>() else {
        return multiply(x);
    };
    if x.dtype() != DType::F32 {
        return multiply(x);
    }
    let x: AutodiffTensor = to_concrete(x);
    let y = if balanced {
        fused_dropout::<BalancedCheckpointing>(x, mask)
    } else {
        fused_dropout::<NoCheckpointing>(x, mask)
    };
    from_concrete(y)
}

/// `x * mask`, into `x`'s buffer where this step holds it alone.
fn masked(x: FlexTensor, mask: KeepMask) -> FlexTensor {
    let mut x = owned(x);
    let n = x.layout().num_elements();
    mask.apply(&mut x.try_storage_mut::<f32>().expect("owned")[..n]);
    x
}

/// `x` contiguous from the start of its buffer (copied only where it is not).
pub(crate) fn from_start(x: FlexTensor) -> FlexTensor {
    let n = x.layout().num_elements();
    if x.layout().contiguous_offsets() == Some((0, n)) {
        return x;
    }
    let c = x.to_contiguous();
    let values = c.storage::<f32>()[c.layout().start_offset()..][..n].to_vec();
    FlexTensor::from_data(TensorData::new(values, x.layout().shape().clone()))
}

/// `x` contiguous from offset 0 and held by this step alone, so that it can be overwritten.
fn owned(x: FlexTensor) -> FlexTensor {
    let mut x = from_start(x);
    if x.try_storage_mut::<f32>().is_none() {
        let n = x.layout().num_elements();
        let copy = x.storage::<f32>()[..n].to_vec();
        x = FlexTensor::from_data(TensorData::new(copy, x.layout().shape().clone()));
    }
    x
}

#[derive(Debug)]
struct DropoutBackward;

impl Backward<Flex, 1> for DropoutBackward {
    type State = KeepMask;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let mask = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |dy| masked(dy, mask));
    }
}

fn fused_dropout<C: CheckpointStrategy>(x: AutodiffTensor, mask: KeepMask) -> AutodiffTensor {
    // Its state is the key alone; kept rather than recomputed under checkpointing.
    let prep = DropoutBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful();
    match prep {
        OpsKind::Tracked(prep) => prep.finish(mask, masked(x.primitive, mask)),
        OpsKind::UnTracked(prep) => prep.finish(masked(x.primitive, mask)),
    }
}

/// `x · w (+ bias)` for rows `x` `[m, k]`: `w` `[k, n]`, or `[n, k]` used transposed
/// (`transposed`, the tied embedding's output projection), `bias` `[n]`. One step on the
/// CPU: the bias is the product's starting value, and every output (forward and backward)
/// is written into a fresh buffer of this step's own. burn-flex's product allocates its
/// output as bytes and then copies them into an aligned buffer (a zeroed buffer written
/// twice, for every product of a step); its bias is a separate broadcast addition, and its
/// bias gradient another sum. `None` where the step does not apply (another backend, not
/// f32); the caller then composes burn's operations.
pub fn product<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    transposed: bool,
    bias: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, 2>> {
    let path = path::<B>()?;
    let f32 = |dtype| dtype == DType::F32;
    if !f32(x.dtype()) || !f32(w.dtype()) || bias.is_some_and(|b| !f32(b.dtype())) {
        return None;
    }
    let [m, k] = x.dims();
    let [wr, wc] = w.dims();
    let n = if transposed { wr } else { wc };
    if (if transposed { wc } else { wr }) != k || bias.is_some_and(|b| b.dims()[0] != n) {
        return None;
    }
    let shape = Product {
        m,
        k,
        n,
        transposed,
    };
    Some(match path {
        Path::Forward => {
            let x: FlexTensor = to_concrete(x.clone());
            let w: FlexTensor = to_concrete(w.clone());
            let b = bias.map(|b| to_concrete::<B, FlexTensor, 1>(b.clone()).to_contiguous());
            let y = shape.forward(&x.to_contiguous(), &w.to_contiguous(), b.as_ref());
            from_concrete(y)
        }
        Path::Autodiff { balanced } => {
            let x: AutodiffTensor = to_concrete(x.clone());
            let w: AutodiffTensor = to_concrete(w.clone());
            let b = bias.map(|b| to_concrete::<B, AutodiffTensor, 1>(b.clone()));
            let y = if balanced {
                fused_product::<BalancedCheckpointing>(x, w, b, shape)
            } else {
                fused_product::<NoCheckpointing>(x, w, b, shape)
            };
            from_concrete(y)
        }
    })
}

/// One product's shape: `[m, k] · [k, n]`, the weight stored `[n, k]` when `transposed`.
#[derive(Clone, Copy, Debug)]
struct Product {
    m: usize,
    k: usize,
    n: usize,
    transposed: bool,
}

/// A row-major matrix operand: its start and its (row, column) strides.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    values: &'a [f32],
    rs: isize,
    cs: isize,
}

impl<'a> Operand<'a> {
    /// Panics unless the operand holds every element of a `rows` x `cols` matrix at its
    /// strides: what makes the products below safe to call with any operands.
    fn check(&self, rows: usize, cols: usize) {
        if rows == 0 || cols == 0 {
            return;
        }
        assert!(self.rs >= 0 && self.cs >= 0, "negative strides");
        let last = (rows - 1) * self.rs as usize + (cols - 1) * self.cs as usize;
        assert!(last < self.values.len(), "a product's operand is too short");
    }

    /// Contiguous rows of `width` values.
    pub(crate) fn rows(values: &'a [f32], width: usize) -> Self {
        Self {
            values,
            rs: width as isize,
            cs: 1,
        }
    }

    pub(crate) fn transpose(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `dst [m, n] (row stride dst_rs) = (dst if accumulate) + lhs [m, k] · rhs [k, n]`. Without
/// `accumulate` the product never reads `dst` (it may be uninitialised).
///
/// # Safety
/// The operands hold every element their shape and strides address, `dst` every element
/// of `m` rows of `n` at stride `dst_rs`, and nothing else accesses those meanwhile.
unsafe fn gemm_raw(
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    [m, k, n]: [usize; 3],
    lhs: Operand,
    rhs: Operand,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's promise.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.values.as_ptr(),
            lhs.cs,
            lhs.rs,
            rhs.values.as_ptr(),
            rhs.cs,
            rhs.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// How many cores a product of this size gets: small ones are not worth waking the other
/// cores for (burn-flex draws the same line), nor are products of a few rows (decoding),
/// which are bound by reading the weights: waking a second core for those cost more than it
/// saved (measured: twice as slow at batch 1).
fn cores_for(m: usize, k: usize, n: usize) -> gemm::Parallelism {
    if m >= 8 && m * n * k >= 1 << 21 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst [m, n] (row-major) = (dst if accumulate) + lhs [m, k] · rhs [k, n]`.
pub(crate) fn gemm_into(
    dst: &mut [f32],
    accumulate: bool,
    [m, k, n]: [usize; 3],
    lhs: Operand,
    rhs: Operand,
) {
    assert!(dst.len() >= m * n, "product output too small");
    lhs.check(m, k);
    rhs.check(k, n);
    // SAFETY: `dst` holds `m * n` values and is borrowed mutably; the operands were checked
    // to cover their shapes.
    unsafe {
        gemm_raw(
            dst.as_mut_ptr(),
            n,
            accumulate,
            [m, k, n],
            lhs,
            rhs,
            cores_for(m, k, n),
        )
    }
}

/// A new product `lhs [m, k] · rhs [k, n]`, without zeroing its buffer first.
fn product_of([m, k, n]: [usize; 3], lhs: Operand, rhs: Operand) -> Vec<f32> {
    lhs.check(m, k);
    rhs.check(k, n);
    // SAFETY: a product that does not accumulate writes each of the m * n values.
    unsafe {
        written(m * n, |dst| {
            gemm_raw(dst.at(0), n, false, [m, k, n], lhs, rhs, cores_for(m, k, n))
        })
    }
}

/// `n` values set by `write` through the pointer it is given, with no zeroing pass first
/// (on the thread that allocates, before any parallel work: measurable on every output).
///
/// # Safety
/// `write` writes all `n` values.
unsafe fn written(n: usize, write: impl FnOnce(Shared)) -> Vec<f32> {
    let mut values = Vec::with_capacity(n);
    write(Shared(values.as_mut_ptr()));
    // SAFETY: the caller's promise: every value was written.
    unsafe { values.set_len(n) };
    values
}

impl Product {
    /// The weight as the `[k, n]` operand.
    fn weight<'a>(&self, w: &'a FlexTensor) -> Operand<'a> {
        let values = &w.storage::<f32>()[..self.k * self.n];
        let stored = Operand {
            values,
            rs: if self.transposed { self.k } else { self.n } as isize,
            cs: 1,
        };
        if self.transposed {
            stored.transpose()
        } else {
            stored
        }
    }

    fn rows<'a>(&self, x: &'a FlexTensor, width: usize) -> Operand<'a> {
        Operand::rows(&x.storage::<f32>()[..self.m * width], width)
    }

    /// `x · w + bias` from contiguous operands.
    fn forward(&self, x: &FlexTensor, w: &FlexTensor, bias: Option<&FlexTensor>) -> FlexTensor {
        let Self { m, k, n, .. } = *self;
        let (xs, ws) = (self.rows(x, k), self.weight(w));
        let y = match bias {
            None => product_of([m, k, n], xs, ws),
            Some(bias) => {
                let bias = &bias.storage::<f32>()[..n];
                let mut y = vec![0f32; m * n];
                y.par_chunks_mut(n)
                    .for_each(|row| row.copy_from_slice(bias));
                gemm_into(&mut y, true, [m, k, n], xs, ws);
                y
            }
        };
        FlexTensor::from_data(TensorData::new(y, [m, n]))
    }
}

#[derive(Clone, Debug)]
struct ProductState {
    x: FlexTensor,
    w: FlexTensor,
    shape: Product,
}

#[derive(Debug)]
struct ProductBackward;

impl Backward<Flex, 3> for ProductBackward {
    type State = ProductState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, w_node, b_node] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let ProductState { x, w, shape } = ops.state;
        let Product {
            m,
            k,
            n,
            transposed,
        } = shape;
        let g = Operand {
            values: &dy.storage::<f32>()[..m * n],
            rs: n as isize,
            cs: 1,
        };
        if let Some(node) = b_node {
            // Column sums, each column's rows in order (the same whatever the threads).
            const COLUMNS: usize = 64;
            let mut db = vec![0f32; n];
            db.par_chunks_mut(COLUMNS)
                .enumerate()
                .for_each(|(c, sums)| {
                    for row in g.values.chunks(n) {
                        let row = &row[c * COLUMNS..][..sums.len()];
                        sums.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
                    }
                });
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(db, [n])));
        }
        if let Some(node) = w_node {
            // The stored weight's gradient: `x^T · dy` `[k, n]`, or `dy^T · x` `[n, k]`.
            let xs = shape.rows(&x, k);
            let (dw, stored) = if transposed {
                (product_of([n, m, k], g.transpose(), xs), [n, k])
            } else {
                (product_of([k, m, n], xs.transpose(), g), [k, n])
            };
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dw, stored)));
        }
        if let Some(node) = x_node {
            let dx = product_of([m, n, k], g, shape.weight(&w).transpose());
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, [m, k])));
        }
    }
}

fn fused_product<C: CheckpointStrategy>(
    x: AutodiffTensor,
    w: AutodiffTensor,
    bias: Option<AutodiffTensor>,
    shape: Product,
) -> AutodiffTensor {
    let xc = x.primitive.to_contiguous();
    let wc = w.primitive.to_contiguous();
    let bc = bias.as_ref().map(|b| b.primitive.to_contiguous());
    let y = shape.forward(&xc, &wc, bc.as_ref());
    // No bias: an untracked zero parent keeps the step's arity fixed (untracked parents
    // have no node, so its gradient is never computed).
    let bias_node = match bias {
        Some(b) => b.node,
        None => {
            let zeros = Tensor::<Autodiff<Flex>, 1>::zeros([shape.n], &Default::default());
            let zeros: AutodiffTensor = zeros.into_primitive().tensor();
            zeros.node
        }
    };
    let prep = ProductBackward
        .prepare::<C>([x.node.clone(), w.node.clone(), bias_node])
        .compute_bound()
        .stateful();
    match prep {
        OpsKind::Tracked(prep) => prep.finish(
            ProductState {
                x: xc,
                w: wc,
                shape,
            },
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

/// Which fused path `B` can take.
enum Path {
    /// Plain flex (evaluation): the forward pass alone.
    Forward,
    Autodiff {
        balanced: bool,
    },
}

fn path<B: Backend>() -> Option<Path> {
    let b = TypeId::of::<B>();
    if b == TypeId::of::<Flex>() {
        Some(Path::Forward)
    } else if b == TypeId::of::<Autodiff<Flex>>() {
        Some(Path::Autodiff { balanced: false })
    } else if b == TypeId::of::<Autodiff<Flex, BalancedCheckpointing>>() {
        Some(Path::Autodiff { balanced: true })
    } else {
        None
    }
}

/// Whether `B` is the CPU backend (flex), alone or under autodiff.
pub(crate) fn on_cpu<B: Backend>() -> bool {
    path::<B>().is_some()
}

/// Moves a float primitive of `B` to the concrete type `T`, through `Any`: the caller has
/// checked (with [`path`]) that `B`'s float primitive is `T`.
pub(crate) fn to_concrete<B: Backend, T: 'static, const D: usize>(x: Tensor<B, D>) -> T {
    try_concrete(x).expect("a float primitive of the backend checked")
}

/// [`to_concrete`] where `B`'s float primitive may not be `T`: None then.
pub(crate) fn try_concrete<B: Backend, T: 'static, const D: usize>(x: Tensor<B, D>) -> Option<T> {
    let mut primitive = Some(x.into_primitive().tensor());
    (&mut primitive as &mut dyn Any)
        .downcast_mut::<Option<T>>()
        .and_then(Option::take)
}

/// The way back from [`to_concrete`].
pub(crate) fn from_concrete<B: Backend, T: 'static, const D: usize>(x: T) -> Tensor<B, D> {
    let x: Box<dyn Any> = Box::new(x);
    let x = *x
        .downcast::<FloatTensor<B>>()
        .unwrap_or_else(|_| unreachable!("the backend's float primitive"));
    Tensor::from_primitive(TensorPrimitive::Float(x))
}

/// Each target token's cross-entropy `[batch, target]` from `logits` `[batch, target,
/// vocab]`, with label smoothing `smoothing` (the target's share `1 - smoothing`, the rest
/// spread evenly): `lse - (1 - s) * x[target] - s * mean(x)`. None where the fused path
/// does not apply (another backend, not f32); the caller then composes burn's operations.
pub fn cross_entropy<B: Backend>(
    logits: &Tensor<B, 3>,
    targets: &Tensor<B, 2, Int>,
    smoothing: f64,
) -> Option<Tensor<B, 2>> {
    let path = path::<B>()?;
    if logits.dtype() != burn::tensor::DType::F32 {
        return None;
    }
    let [b, t, _] = logits.dims();
    let targets: Arc<Vec<i64>> = Arc::new(targets.to_data().iter::<i64>().collect());
    let smoothing = smoothing as f32;
    Some(match path {
        Path::Forward => {
            let x: FlexTensor = to_concrete(logits.clone());
            let (loss, _) = ce_forward(&x.to_contiguous(), &targets, smoothing);
            from_concrete::<B, _, 2>(ce_tensor(loss, [b, t]))
        }
        Path::Autodiff { balanced } => {
            let x: AutodiffTensor = to_concrete(logits.clone());
            let out = if balanced {
                fused_ce::<BalancedCheckpointing>(x, targets, smoothing, [b, t])
            } else {
                fused_ce::<NoCheckpointing>(x, targets, smoothing, [b, t])
            };
            from_concrete::<B, _, 2>(out)
        }
    })
}

fn ce_tensor(values: Vec<f32>, shape: [usize; 2]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Per row of a contiguous `[.., vocab]` tensor: the loss and the log-sum-exp.
fn ce_forward(x: &FlexTensor, targets: &[i64], smoothing: f32) -> (Vec<f32>, Vec<f32>) {
    let vocab = *x
        .layout()
        .shape()
        .last()
        .expect("logits have a vocabulary dimension");
    let rows: Vec<(f32, f32)> = x.storage::<f32>()[..targets.len() * vocab]
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &target)| {
            let lse = rowmath::log_sum_exp(row);
            let mean = rowmath::sum(row) / vocab as f32;
            let nll = lse - row[target as usize];
            ((1.0 - smoothing) * nll + smoothing * (lse - mean), lse)
        })
        .collect();
    rows.into_iter().unzip()
}

#[derive(Clone, Debug)]
struct CeState {
    logits: FlexTensor,
    targets: Arc<Vec<i64>>,
    lse: Arc<Vec<f32>>,
    smoothing: f32,
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    type State = CeState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |dy| {
            let shape = s.logits.layout().shape().clone();
            let vocab = shape[shape.num_dims() - 1];
            let dy = dy.to_contiguous();
            let dy = dy.storage::<f32>();
            let spread = s.smoothing / vocab as f32;
            let keep = 1.0 - s.smoothing;
            let mut dx = vec![0f32; s.targets.len() * vocab];
            // d loss / d x_j = softmax_j - (1 - s) [j = target] - s / vocab, times the
            // token's incoming gradient.
            dx.par_chunks_mut(vocab)
                .zip(s.logits.storage::<f32>().par_chunks(vocab))
                .enumerate()
                .for_each(|(r, (out, row))| {
                    let (g, lse) = (dy[r], s.lse[r]);
                    for (o, &v) in out.iter_mut().zip(row) {
                        *o = g * (rowmath::exp(v - lse) - spread);
                    }
                    out[s.targets[r] as usize] -= g * keep;
                });
            FlexTensor::from_data(TensorData::new(dx, shape))
        });
    }
}

fn fused_ce<C: CheckpointStrategy>(
    x: AutodiffTensor,
    targets: Arc<Vec<i64>>,
    smoothing: f32,
    shape: [usize; 2],
) -> AutodiffTensor {
    let prep = CrossEntropyBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful();
    let logits = x.primitive.to_contiguous();
    let (loss, lse) = ce_forward(&logits, &targets, smoothing);
    match prep {
        OpsKind::Tracked(prep) => {
            let state = CeState {
                logits,
                targets,
                lse: Arc::new(lse),
                smoothing,
            };
            prep.finish(state, ce_tensor(loss, shape))
        }
        OpsKind::UnTracked(prep) => prep.finish(ce_tensor(loss, shape)),
    }
}

/// burn's layer-norm epsilon (the default of every norm the model builds; its field is
/// private, the test below checks that the fused norm matches burn's).
pub(crate) const LAYER_NORM_EPS: f32 = 1e-5;

/// Rows per block of the parameter-gradient sums: blocks are summed in parallel, then in
/// order, so the result does not depend on how threads split the work.
const NORM_BLOCK: usize = 64;

/// `norm.forward(x)`, as one fused step under autodiff on the CPU.
pub fn layer_norm<B: Backend, const D: usize>(
    norm: &burn::nn::LayerNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let Some(Path::Autodiff { balanced }) = path::<B>() else {
        return norm.forward(x);
    };
    if x.dtype() != burn::tensor::DType::F32 || norm.gamma.val().dtype() != x.dtype() {
        return norm.forward(x);
    }
    let shape = x.shape();
    let gamma: AutodiffTensor = to_concrete(norm.gamma.val());
    let beta = norm
        .beta
        .as_ref()
        .map(|b| to_concrete::<B, AutodiffTensor, 1>(b.val()));
    let x: AutodiffTensor = to_concrete(x.reshape([shape.num_elements()]));
    let y = if balanced {
        fused_norm::<BalancedCheckpointing>(x, gamma, beta)
    } else {
        fused_norm::<NoCheckpointing>(x, gamma, beta)
    };
    from_concrete::<B, _, 1>(y).reshape(shape)
}

#[derive(Clone, Debug)]
struct NormState {
    /// `(x - mean) / std`, flat.
    normalized: Arc<Vec<f32>>,
    rstd: Arc<Vec<f32>>,
    gamma: FlexTensor,
}

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    type State = NormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        let [x_node, gamma_node, beta_node] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let dy = dy.storage::<f32>();
        let gamma = s.gamma.to_contiguous();
        let gamma = gamma.storage::<f32>();
        let d = gamma.len();
        let xn = &s.normalized[..];
        if let Some(node) = x_node {
            let mut dx = vec![0f32; xn.len()];
            dx.par_chunks_mut(d)
                .zip(dy.par_chunks(d).zip(xn.par_chunks(d)))
                .zip(s.rstd.par_iter())
                .for_each(|((out, (dy, xn)), &rstd)| {
                    let (mut m1, mut m2) = (0f32, 0f32);
                    for i in 0..d {
                        let g = dy[i] * gamma[i];
                        m1 += g;
                        m2 += g * xn[i];
                    }
                    let (m1, m2) = (m1 / d as f32, m2 / d as f32);
                    for i in 0..d {
                        out[i] = rstd * (dy[i] * gamma[i] - m1 - xn[i] * m2);
                    }
                });
            let dx = FlexTensor::from_data(TensorData::new(dx, [xn.len()]));
            grads.register::<Flex>(node.id, dx);
        }
        if gamma_node.is_some() || beta_node.is_some() {
            // Per block of rows in parallel, then the blocks in order: deterministic.
            let partial: Vec<(Vec<f32>, Vec<f32>)> = dy
                .par_chunks(d * NORM_BLOCK)
                .zip(xn.par_chunks(d * NORM_BLOCK))
                .map(|(dy, xn)| {
                    let (mut dg, mut db) = (vec![0f32; d], vec![0f32; d]);
                    for (dy, xn) in dy.chunks(d).zip(xn.chunks(d)) {
                        for i in 0..d {
                            dg[i] += dy[i] * xn[i];
                            db[i] += dy[i];
                        }
                    }
                    (dg, db)
                })
                .collect();
            let (mut dg, mut db) = (vec![0f32; d], vec![0f32; d]);
            for (pg, pb) in partial {
                for i in 0..d {
                    dg[i] += pg[i];
                    db[i] += pb[i];
                }
            }
            if let Some(node) = gamma_node {
                grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dg, [d])));
            }
            if let Some(node) = beta_node {
                grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(db, [d])));
            }
        }
    }
}

fn fused_norm<C: CheckpointStrategy>(
    x: AutodiffTensor,
    gamma: AutodiffTensor,
    beta: Option<AutodiffTensor>,
) -> AutodiffTensor {
    let g = gamma.primitive.to_contiguous();
    let d = g.layout().num_elements();
    let b = beta.as_ref().map(|b| b.primitive.to_contiguous());
    let input = x.primitive.to_contiguous();
    let values = input.storage::<f32>();
    let mut normalized = vec![0f32; values.len()];
    let mut out = vec![0f32; values.len()];
    let mut rstd = vec![0f32; values.len() / d];
    let (gs, bs) = (g.storage::<f32>(), b.as_ref().map(|b| b.storage::<f32>()));
    normalized
        .par_chunks_mut(d)
        .zip(out.par_chunks_mut(d))
        .zip(values.par_chunks(d).zip(rstd.par_iter_mut()))
        .for_each(|((xn, y), (x, r))| {
            let mean = x.iter().sum::<f32>() / d as f32;
            let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            *r = 1.0 / (var + LAYER_NORM_EPS).sqrt();
            for i in 0..d {
                xn[i] = (x[i] - mean) * *r;
                y[i] = xn[i] * gs[i] + bs.map_or(0.0, |b| b[i]);
            }
        });
    let output = FlexTensor::from_data(TensorData::new(out, [values.len()]));
    let zero_beta = || -> AutodiffTensor {
        // A norm without a bias: a constant zero parent keeps the step's arity fixed.
        let zeros = Tensor::<Autodiff<Flex>, 1>::zeros([d], &Default::default());
        zeros.into_primitive().tensor()
    };
    let beta = beta.unwrap_or_else(zero_beta);
    let prep = LayerNormBackward
        .prepare::<C>([x.node.clone(), gamma.node.clone(), beta.node.clone()])
        .compute_bound()
        .stateful();
    match prep {
        OpsKind::Tracked(prep) => {
            let state = NormState {
                normalized: Arc::new(normalized),
                rstd: Arc::new(rstd),
                gamma: g,
            };
            prep.finish(state, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation;
    use burn::tensor::Distribution;

    /// burn's composition of multi-head attention's core, the reference for the fused step.
    fn reference<B: Backend>(
        [q, k, v]: [Tensor<B, 3>; 3],
        heads: usize,
        root: f32,
        bias: Tensor<B, 4>,
        mask: Option<KeepMask>,
    ) -> Tensor<B, 3> {
        let [b, t, d] = q.dims();
        let s = k.dims()[1];
        let split = |x: Tensor<B, 3>, len| x.reshape([b, len, heads, d / heads]).swap_dims(1, 2);
        let scores = split(q, t).matmul(split(k, s).swap_dims(2, 3));
        let mut weights = activation::softmax(scores.div_scalar(root) + bias, 3);
        if let Some(mask) = mask {
            let values = TensorData::new(mask.values(b * heads * t * s), [b, heads, t, s]);
            weights = weights * Tensor::from_data(values, &Default::default());
        }
        weights
            .matmul(split(v, s))
            .swap_dims(1, 2)
            .reshape([b, t, d])
    }

    /// The fused attention core's value and the gradients of q, k and v against burn's
    /// operations, for each way the bias broadcasts, with and without dropout, self- and
    /// cross-attention lengths.
    fn check_attention<A: burn::tensor::backend::AutodiffBackend>(
        bias_dims: [usize; 4],
        drop: bool,
    ) {
        let device = Default::default();
        A::seed(&device, 7);
        let (b, t, s, heads, dk) = (2, 5, bias_dims[3], 3, 4);
        let d = heads * dk;
        let random = |len| {
            Tensor::<A, 3>::random([b, len, d], Distribution::Normal(0.0, 1.5), &device)
                .require_grad()
        };
        let inputs = [random(t), random(s), random(s)];
        let probe = Tensor::<A, 3>::random([b, t, d], Distribution::Default, &device);
        let bias = Tensor::<A, 4>::random(bias_dims, Distribution::Normal(0.0, 3.0), &device);
        let mask = drop.then(|| KeepMask::new(11, 2.0 / 3.0));
        let root = 2.0;
        let ours = attention(inputs.clone(), heads, root, &bias, || mask)
            .unwrap_or_else(|_| panic!("the fused path applies"));
        let burns = reference(inputs.clone(), heads, root, bias, mask);
        let tol = burn::tensor::Tolerance::absolute(1e-5);
        ours.to_data()
            .assert_approx_eq::<f32>(&burns.to_data(), tol);
        let g_ours = (ours * probe.clone()).sum().backward();
        let g_burn = (burns * probe).sum().backward();
        for x in &inputs {
            x.grad(&g_ours)
                .unwrap()
                .to_data()
                .assert_approx_eq::<f32>(&x.grad(&g_burn).unwrap().to_data(), tol);
        }
    }

    #[test]
    fn fused_attention_matches_burns_value_and_gradients() {
        for bias in [[2, 1, 1, 5], [1, 1, 5, 5], [2, 1, 5, 5], [2, 1, 1, 7]] {
            check_attention::<Autodiff<Flex>>(bias, false);
            check_attention::<Autodiff<Flex>>(bias, true);
            check_attention::<Autodiff<Flex, BalancedCheckpointing>>(bias, true);
        }
    }

    /// Evaluation (plain flex, no autodiff) takes the forward pass alone.
    #[test]
    fn fused_attention_forward_matches_burns() {
        let device = Default::default();
        let random = |len| Tensor::<Flex, 3>::random([2, len, 8], Distribution::Default, &device);
        let inputs = [random(3), random(6), random(6)];
        let bias = Tensor::<Flex, 4>::random([2, 1, 1, 6], Distribution::Default, &device);
        let ours = attention(inputs.clone(), 2, 1.5, &bias, || unreachable!("no dropout"))
            .unwrap_or_else(|_| panic!("the fused path applies"));
        let burns = reference(inputs, 2, 1.5, bias, None);
        ours.to_data()
            .assert_approx_eq::<f32>(&burns.to_data(), burn::tensor::Tolerance::absolute(1e-6));
    }

    /// The fused cross-entropy against log-softmax and gather, value and gradient.
    fn check_ce<A: burn::tensor::backend::AutodiffBackend>(smoothing: f64) {
        let device = Default::default();
        A::seed(&device, 3);
        let (b, t, v) = (2, 3, 11);
        let x = Tensor::<A, 3>::random([b, t, v], Distribution::Normal(0.0, 3.0), &device)
            .require_grad();
        let targets = Tensor::<A, 2, Int>::from_data(
            TensorData::new(vec![0i64, 4, 10, 7, 7, 1], [b, t]),
            &device,
        );
        let w = Tensor::<A, 2>::random([b, t], Distribution::Default, &device);
        let ours = cross_entropy(&x, &targets, smoothing).expect("the fused path applies");
        let logp = activation::log_softmax(x.clone(), 2);
        let nll = logp
            .clone()
            .gather(2, targets.reshape([b, t, 1]))
            .reshape([b, t])
            .neg();
        let uniform = logp.mean_dim(2).reshape([b, t]).neg();
        let burns = nll * (1.0 - smoothing) + uniform * smoothing;
        let tol = burn::tensor::Tolerance::absolute(1e-5);
        ours.to_data()
            .assert_approx_eq::<f32>(&burns.to_data(), tol);
        let g_ours = (ours * w.clone()).sum().backward();
        let g_burn = (burns * w).sum().backward();
        x.grad(&g_ours)
            .unwrap()
            .to_data()
            .assert_approx_eq::<f32>(&x.grad(&g_burn).unwrap().to_data(), tol);
    }

    #[test]
    fn fused_cross_entropy_matches_burns_value_and_gradient() {
        check_ce::<Autodiff<Flex>>(0.0);
        check_ce::<Autodiff<Flex>>(0.1);
        check_ce::<Autodiff<Flex, BalancedCheckpointing>>(0.1);
    }

    /// The fused layer norm against burn's, value and the three gradients.
    fn check_norm<A: burn::tensor::backend::AutodiffBackend>() {
        let device = Default::default();
        A::seed(&device, 5);
        // 150 rows: more than two blocks of the parameter sums, the last one short.
        let norm = burn::nn::LayerNormConfig::new(16).init::<A>(&device);
        let norm = norm.map(&mut RandomiseNorm);
        let x = Tensor::<A, 3>::random([3, 50, 16], Distribution::Normal(1.0, 2.0), &device)
            .require_grad();
        let w = Tensor::<A, 3>::random([3, 50, 16], Distribution::Default, &device);
        let ours = layer_norm(&norm, x.clone());
        let burns = norm.forward(x.clone());
        let tol = burn::tensor::Tolerance::absolute(1e-5);
        ours.to_data()
            .assert_approx_eq::<f32>(&burns.to_data(), tol);
        let g_ours = (ours * w.clone()).sum().backward();
        let g_burn = (burns * w).sum().backward();
        let grad = |g: &<A as burn::tensor::backend::AutodiffBackend>::Gradients| {
            [
                x.grad(g).unwrap().into_data(),
                norm.gamma.val().grad(g).unwrap().into_data(),
                norm.beta
                    .as_ref()
                    .unwrap()
                    .val()
                    .grad(g)
                    .unwrap()
                    .into_data(),
            ]
        };
        for (a, b) in grad(&g_ours).iter().zip(grad(&g_burn).iter()) {
            a.assert_approx_eq::<f32>(b, burn::tensor::Tolerance::absolute(1e-4));
        }
    }

    /// Non-trivial scale and bias, so that their gradients and use are checked.
    struct RandomiseNorm;
    impl<B: Backend> burn::module::ModuleMapper<B> for RandomiseNorm {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<B, D>>,
        ) -> burn::module::Param<Tensor<B, D>> {
            let (id, t, mapper) = param.consume();
            let t = (t.clone() + Tensor::random(t.shape(), Distribution::Default, &t.device()))
                .detach()
                .require_grad();
            burn::module::Param::from_mapped_value(id, t, mapper)
        }
    }

    #[test]
    fn fused_layer_norm_matches_burns_value_and_gradients() {
        check_norm::<Autodiff<Flex>>();
        check_norm::<Autodiff<Flex, BalancedCheckpointing>>();
    }

    /// The fused product against burn's matmul (and broadcast bias), value and the three
    /// gradients, for a weight used as stored and transposed.
    fn check_product<A: burn::tensor::backend::AutodiffBackend>(transposed: bool, biased: bool) {
        let device = Default::default();
        A::seed(&device, 13);
        let (m, k, n) = (37, 19, 23);
        let x = Tensor::<A, 2>::random([m, k], Distribution::Default, &device).require_grad();
        let dims = if transposed { [n, k] } else { [k, n] };
        let w = Tensor::<A, 2>::random(dims, Distribution::Default, &device).require_grad();
        let b = Tensor::<A, 1>::random([n], Distribution::Default, &device).require_grad();
        let probe = Tensor::<A, 2>::random([m, n], Distribution::Default, &device);
        let bias = biased.then(|| b.clone());
        let ours = product(&x, &w, transposed, bias.as_ref()).expect("the fused path applies");
        let weight = if transposed {
            w.clone().transpose()
        } else {
            w.clone()
        };
        let mut burns = x.clone().matmul(weight);
        if biased {
            burns = burns + b.clone().unsqueeze();
        }
        let tol = burn::tensor::Tolerance::absolute(1e-5);
        ours.to_data()
            .assert_approx_eq::<f32>(&burns.to_data(), tol);
        let g_ours = (ours * probe.clone()).sum().backward();
        let g_burn = (burns * probe).sum().backward();
        let data = |t: Option<Tensor<A::InnerBackend, 2>>| t.map(|t| t.into_data());
        for (ours, burns) in [
            (data(x.grad(&g_ours)), data(x.grad(&g_burn))),
            (data(w.grad(&g_ours)), data(w.grad(&g_burn))),
            (
                b.grad(&g_ours).map(|t| t.into_data()),
                b.grad(&g_burn).map(|t| t.into_data()),
            ),
        ] {
            assert_eq!(ours.is_some(), burns.is_some());
            if let (Some(ours), Some(burns)) = (ours, burns) {
                ours.assert_approx_eq::<f32>(&burns, tol);
            }
        }
        assert_eq!(b.grad(&g_ours).is_some(), biased);
    }

    #[test]
    fn fused_product_matches_burns_value_and_gradients() {
        for (transposed, biased) in [(false, true), (false, false), (true, false)] {
            check_product::<Autodiff<Flex>>(transposed, biased);
            check_product::<Autodiff<Flex, BalancedCheckpointing>>(transposed, biased);
        }
        // Evaluation: the forward pass alone.
        let device = Default::default();
        let x = Tensor::<Flex, 2>::random([5, 3], Distribution::Default, &device);
        let w = Tensor::<Flex, 2>::random([4, 3], Distribution::Default, &device);
        let ours = product(&x, &w, true, None).expect("the fused path applies");
        ours.to_data().assert_approx_eq::<f32>(
            &x.matmul(w.transpose()).to_data(),
            burn::tensor::Tolerance::absolute(1e-5),
        );
    }
}
