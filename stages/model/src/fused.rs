//! Operations that burn's autodiff backend splits into several, given one step of their own
//! on the CPU. Under `Autodiff`, burn 0.21 computes a softmax as five operations (max,
//! subtract, exp, sum, divide, each with its own backward and its own pass over the
//! attention scores, the broadcasts through a slow strided path in burn-flex), although flex
//! has a fused softmax. Here the forward pass is flex's fused kernel, and the backward pass
//! the softmax's own Jacobian product, `dx = y * (dy - sum(dy * y))`, from the saved output.
//! The same for the loss: a log-softmax over the vocabulary (8,000 values per target token,
//! the largest tensors of a step) followed by a gather is, under autodiff, a dozen passes
//! over the logits forward and backward; here it is one step that computes each token's
//! cross-entropy from its row's log-sum-exp, and whose backward writes
//! `softmax - target distribution` in one pass.
//! And layer normalisation (22 per step for `mini`), nine operations under autodiff, is one
//! step with the textbook backward. And the attention heads' reordering (`[b, t, h, dk]` to
//! `[b, h, t, dk]` and back), which burn-flex copies element by element wherever it needs
//! the result contiguous (the backward pass of every head split), is a copy of `dk`-value
//! runs each way.
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

/// burn-autodiff's float tensor (its type is not exported by name).
type AutodiffTensor = FloatTensor<Autodiff<Flex>>;

/// The attention weights `dropout(softmax(scores / root + bias))` over the last dimension,
/// as one step: `scores` `[batch, heads, query, key]`, `bias` `[batch or 1, 1, query or 1,
/// key]` (broadcast over the rest, as an addition would), `keep` the dropout's keep mask
/// (None: no dropout), asked for only on the fused path. Under
/// burn's own operations this is five passes forward (the bias through burn-flex's strided
/// broadcast, element by element), and seven backward. Here it is one pass each way: the
/// backward's `dx = y * (g - sum(g * y)) / root` with `g = dy * mask`, from the saved
/// softmax `y`. `Err(scores)` where the step does not apply (another backend, not f32); the
/// caller then composes burn's operations.
pub fn attention_weights<B: Backend>(
    scores: Tensor<B, 4>,
    root: f32,
    bias: &Tensor<B, 4>,
    keep: impl FnOnce() -> Option<KeepMask>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let Some(path) = path::<B>() else {
        return Err(scores);
    };
    if scores.dtype() != DType::F32 || bias.dtype() != DType::F32 {
        return Err(scores);
    }
    let [b, h, t, s] = scores.dims();
    let [bb, one, bt, bs] = bias.dims();
    if !((bb == b || bb == 1) && one == 1 && (bt == t || bt == 1) && bs == s) {
        return Err(scores);
    }
    let rows = Rows {
        heads: h,
        query: t,
        key: s,
        bias_per_batch: bb > 1,
        bias_per_query: bt > 1,
    };
    Ok(match path {
        Path::Forward => {
            let x: FlexTensor = to_concrete(scores);
            let bias: FlexTensor = to_concrete(bias.clone());
            let (y, _) = weights_forward(x, &bias.to_contiguous(), root, None, rows);
            from_concrete(y)
        }
        Path::Autodiff { balanced } => {
            let x: AutodiffTensor = to_concrete(scores);
            let bias: AutodiffTensor = to_concrete(bias.clone());
            let bias = bias.primitive.to_contiguous();
            let mask = keep();
            let out = if balanced {
                fused_weights::<BalancedCheckpointing>(x, &bias, root, mask, rows)
            } else {
                fused_weights::<NoCheckpointing>(x, &bias, root, mask, rows)
            };
            from_concrete(out)
        }
    })
}

/// How the rows of the scores map to rows of the bias.
#[derive(Clone, Copy, Debug)]
struct Rows {
    heads: usize,
    query: usize,
    key: usize,
    bias_per_batch: bool,
    bias_per_query: bool,
}

impl Rows {
    /// The bias row added to scores row `r`.
    fn bias_row(&self, r: usize) -> usize {
        let batch = if self.bias_per_batch {
            r / (self.heads * self.query)
        } else {
            0
        };
        let query = if self.bias_per_query {
            r % self.query
        } else {
            0
        };
        batch * if self.bias_per_query { self.query } else { 1 } + query
    }
}

/// Rows per parallel task: enough work to amortise the task, rows stay independent.
const ROWS_PER_TASK: usize = 64;

/// `x` contiguous from offset 0 and held by this step alone, so that it can be overwritten.
fn owned(x: FlexTensor) -> FlexTensor {
    let n = x.layout().num_elements();
    let mut x = if x.layout().contiguous_offsets() == Some((0, n)) {
        x
    } else {
        x.to_contiguous()
    };
    if x.try_storage_mut::<f32>().is_none() {
        let copy = x.storage::<f32>()[..n].to_vec();
        x = FlexTensor::from_data(TensorData::new(copy, x.layout().shape().clone()));
    }
    x
}

/// The softmax `y` (overwriting the scores) and, with a mask, the output `y * mask`.
fn weights_forward(
    x: FlexTensor,
    bias: &FlexTensor,
    root: f32,
    mask: Option<KeepMask>,
    rows: Rows,
) -> (FlexTensor, Option<FlexTensor>) {
    let mut y = owned(x);
    let s = rows.key;
    let n = y.layout().num_elements();
    let bias = bias.storage::<f32>();
    let values = &mut y.try_storage_mut::<f32>().expect("owned")[..n];
    values
        .par_chunks_mut(ROWS_PER_TASK * s)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, row) in chunk.chunks_mut(s).enumerate() {
                let add = &bias[rows.bias_row(task * ROWS_PER_TASK + i) * s..][..s];
                let mut max = f32::NEG_INFINITY;
                for (v, &a) in row.iter_mut().zip(add) {
                    *v = *v / root + a;
                    max = max.max(*v);
                }
                let mut sum = 0.0;
                for v in row.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|v| *v *= inv);
            }
        });
    let dropped = mask.map(|mask| {
        let mut out = y.storage::<f32>()[..n].to_vec();
        mask.apply(&mut out);
        FlexTensor::from_data(TensorData::new(out, y.layout().shape().clone()))
    });
    (y, dropped)
}

/// The attention weights' saved state: the softmax and the dropout mask.
#[derive(Clone, Debug)]
struct WeightsState {
    y: FlexTensor,
    mask: Option<KeepMask>,
    root: f32,
    key: usize,
}

#[derive(Debug)]
struct WeightsBackward;

impl Backward<Flex, 1> for WeightsBackward {
    type State = WeightsState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let st = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |dy| {
            let mut dx = owned(dy);
            let s = st.key;
            let n = dx.layout().num_elements();
            let ys = &st.y.storage::<f32>()[..n];
            let g = &mut dx.try_storage_mut::<f32>().expect("owned")[..n];
            if let Some(mask) = st.mask {
                mask.apply(g);
            }
            g.par_chunks_mut(ROWS_PER_TASK * s)
                .zip(ys.par_chunks(ROWS_PER_TASK * s))
                .for_each(|(g, y)| {
                    for (g, y) in g.chunks_mut(s).zip(y.chunks(s)) {
                        let dot: f32 = g.iter().zip(y).map(|(&g, &y)| g * y).sum();
                        for (g, &y) in g.iter_mut().zip(y) {
                            *g = y * (*g - dot) / st.root;
                        }
                    }
                });
            dx
        });
    }
}

fn fused_weights<C: CheckpointStrategy>(
    x: AutodiffTensor,
    bias: &FlexTensor,
    root: f32,
    mask: Option<KeepMask>,
    rows: Rows,
) -> AutodiffTensor {
    // Compute-bound: the softmax is kept for the backward pass rather than recomputed, under
    // gradient checkpointing too (it is the state).
    let prep = WeightsBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful();
    let (y, dropped) = weights_forward(x.primitive, bias, root, mask, rows);
    let out = dropped.unwrap_or_else(|| y.clone());
    match prep {
        OpsKind::Tracked(prep) => {
            let state = WeightsState {
                y,
                mask,
                root,
                key: rows.key,
            };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
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
struct Operand<'a> {
    values: &'a [f32],
    rs: isize,
    cs: isize,
}

impl Operand<'_> {
    fn transpose(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `dst [m, n] (row-major) = (dst if accumulate) + lhs [m, k] · rhs [k, n]`.
fn gemm_into(dst: &mut [f32], accumulate: bool, [m, k, n]: [usize; 3], lhs: Operand, rhs: Operand) {
    assert!(dst.len() >= m * n, "product output too small");
    // Small products are not worth waking the other cores (burn-flex draws the same line).
    let parallelism = if m * n * k >= 1 << 21 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the operands hold every element their shape and strides address (checked by
    // the callers' shapes: contiguous `[m, k]`, `[k, n]` or `[n, k]` tensors), and `dst`
    // holds `m * n` values and is not aliased.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
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
        Operand {
            values: &x.storage::<f32>()[..self.m * width],
            rs: width as isize,
            cs: 1,
        }
    }

    /// `x · w + bias` from contiguous operands.
    fn forward(&self, x: &FlexTensor, w: &FlexTensor, bias: Option<&FlexTensor>) -> FlexTensor {
        let Self { m, k, n, .. } = *self;
        let mut y = vec![0f32; m * n];
        if let Some(bias) = bias {
            let bias = &bias.storage::<f32>()[..n];
            y.par_chunks_mut(n)
                .for_each(|row| row.copy_from_slice(bias));
        }
        gemm_into(
            &mut y,
            bias.is_some(),
            [m, k, n],
            self.rows(x, k),
            self.weight(w),
        );
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
            let mut dw = vec![0f32; k * n];
            let stored = if transposed {
                gemm_into(&mut dw, false, [n, m, k], g.transpose(), xs);
                [n, k]
            } else {
                gemm_into(&mut dw, false, [k, m, n], xs.transpose(), g);
                [k, n]
            };
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dw, stored)));
        }
        if let Some(node) = x_node {
            let mut dx = vec![0f32; m * k];
            gemm_into(&mut dx, false, [m, n, k], g, shape.weight(&w).transpose());
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
    let n = shape.n;
    let bias = bias.unwrap_or_else(|| {
        // No bias: an untracked zero parent keeps the step's arity fixed (its gradient is
        // never computed: untracked parents have no node).
        let zeros = Tensor::<Autodiff<Flex>, 1>::zeros([n], &Default::default());
        zeros.into_primitive().tensor()
    });
    let xc = x.primitive.to_contiguous();
    let wc = w.primitive.to_contiguous();
    let bc = bias.primitive.to_contiguous();
    let y = shape.forward(&xc, &wc, Some(&bc));
    let prep = ProductBackward
        .prepare::<C>([x.node.clone(), w.node.clone(), bias.node.clone()])
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
fn to_concrete<B: Backend, T: 'static, const D: usize>(x: Tensor<B, D>) -> T {
    let mut primitive = Some(x.into_primitive().tensor());
    (&mut primitive as &mut dyn Any)
        .downcast_mut::<Option<T>>()
        .and_then(Option::take)
        .expect("a float primitive of the backend checked")
}

/// The way back from [`to_concrete`].
fn from_concrete<B: Backend, T: 'static, const D: usize>(x: T) -> Tensor<B, D> {
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
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
            let lse = max + sum.ln();
            let mean = row.iter().sum::<f32>() / vocab as f32;
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
                        *o = g * ((v - lse).exp() - spread);
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
const LAYER_NORM_EPS: f32 = 1e-5;

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

/// `[b, m, n, dk]` to `[b, n, m, dk]` (`x.swap_dims(1, 2)`), contiguous.
pub fn swap_middle<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let Some(Path::Autodiff { balanced }) = path::<B>() else {
        return x.swap_dims(1, 2);
    };
    if x.dtype() != burn::tensor::DType::F32 {
        return x.swap_dims(1, 2);
    }
    let dims = x.dims();
    let x: AutodiffTensor = to_concrete(x);
    let y = if balanced {
        fused_swap::<BalancedCheckpointing>(x, dims)
    } else {
        fused_swap::<NoCheckpointing>(x, dims)
    };
    from_concrete(y)
}

/// The reordering itself, on a contiguous `[b, m, n, dk]` tensor.
fn swap_copy(x: &FlexTensor, [b, m, n, dk]: [usize; 4]) -> FlexTensor {
    let x = x.to_contiguous();
    let src = &x.storage::<f32>()[..b * m * n * dk];
    let mut dst = vec![0f32; src.len()];
    dst.par_chunks_mut(m * n * dk)
        .zip(src.par_chunks(m * n * dk))
        .for_each(|(dst, src)| {
            for i in 0..m {
                for j in 0..n {
                    dst[(j * m + i) * dk..][..dk].copy_from_slice(&src[(i * n + j) * dk..][..dk]);
                }
            }
        });
    FlexTensor::from_data(TensorData::new(dst, [b, n, m, dk]))
}

#[derive(Debug)]
struct SwapBackward;

impl Backward<Flex, 1> for SwapBackward {
    /// The input's dimensions.
    type State = [usize; 4];

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [b, m, n, dk] = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |dy| {
            swap_copy(&dy, [b, n, m, dk])
        });
    }
}

fn fused_swap<C: CheckpointStrategy>(x: AutodiffTensor, dims: [usize; 4]) -> AutodiffTensor {
    let prep = SwapBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful();
    let y = swap_copy(&x.primitive, dims);
    match prep {
        OpsKind::Tracked(prep) => prep.finish(dims, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation;
    use burn::tensor::Distribution;

    /// The fused attention weights' value and gradient against burn's operations, for each
    /// way the bias broadcasts, with and without a dropout mask.
    fn check_weights<A: burn::tensor::backend::AutodiffBackend>(bias_dims: [usize; 4], drop: bool) {
        let device = Default::default();
        A::seed(&device, 7);
        let dims = [2, 3, 5, 7];
        let n = dims.iter().product();
        let x =
            Tensor::<A, 4>::random(dims, Distribution::Normal(0.0, 2.0), &device).require_grad();
        let w = Tensor::<A, 4>::random(dims, Distribution::Default, &device);
        let bias = Tensor::<A, 4>::random(bias_dims, Distribution::Normal(0.0, 3.0), &device);
        let mask = KeepMask::new(11, 2.0 / 3.0);
        let root = 2.5;
        let ours = attention_weights(x.clone(), root, &bias, || drop.then_some(mask))
            .unwrap_or_else(|_| panic!("the fused path applies"));
        let mut burns = activation::softmax(x.clone().div_scalar(root) + bias, 3);
        if drop {
            let mask = TensorData::new(mask.values(n), dims);
            burns = burns * Tensor::from_data(mask, &device);
        }
        let tol = burn::tensor::Tolerance::absolute(1e-6);
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
    fn fused_attention_weights_match_burns_value_and_gradient() {
        for bias in [[2, 1, 1, 7], [1, 1, 5, 7], [2, 1, 5, 7]] {
            check_weights::<Autodiff<Flex>>(bias, false);
            check_weights::<Autodiff<Flex>>(bias, true);
            check_weights::<Autodiff<Flex, BalancedCheckpointing>>(bias, true);
        }
    }

    /// Evaluation (plain flex, no autodiff) takes the forward pass alone.
    #[test]
    fn fused_attention_weights_forward_matches_burns() {
        let device = Default::default();
        let x = Tensor::<Flex, 4>::random([2, 3, 5, 7], Distribution::Normal(0.0, 2.0), &device);
        let bias = Tensor::<Flex, 4>::random([2, 1, 5, 7], Distribution::Default, &device);
        let ours = attention_weights(x.clone(), 1.5, &bias, || unreachable!("no dropout"))
            .unwrap_or_else(|_| panic!("the fused path applies"));
        let burns = activation::softmax(x.div_scalar(1.5) + bias, 3);
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

    fn check_swap<A: burn::tensor::backend::AutodiffBackend>() {
        let device = Default::default();
        A::seed(&device, 9);
        let x = Tensor::<A, 4>::random([2, 5, 3, 4], Distribution::Default, &device).require_grad();
        let w = Tensor::<A, 4>::random([2, 3, 5, 4], Distribution::Default, &device);
        let ours = swap_middle(x.clone());
        let burns = x.clone().swap_dims(1, 2);
        ours.to_data().assert_eq(&burns.to_data(), true);
        let g_ours = (ours * w.clone()).sum().backward();
        let g_burn = (burns * w).sum().backward();
        x.grad(&g_ours)
            .unwrap()
            .to_data()
            .assert_eq(&x.grad(&g_burn).unwrap().to_data(), true);
    }

    #[test]
    fn fused_head_reordering_matches_swap_dims() {
        check_swap::<Autodiff<Flex>>();
        check_swap::<Autodiff<Flex, BalancedCheckpointing>>();
    }
}
