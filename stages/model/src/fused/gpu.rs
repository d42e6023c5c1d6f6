//! Layer normalisation, attention's softmax, dropout and the loss as one autodiff step each
//! on the GPU backends (CUDA; wgpu, which runs the same code in tests), computed with the
//! inner backend's tensor operations (burn-fusion fuses them as it fuses any) and a
//! hand-written backward.
//!
//! Why: every operation costs the host work (autodiff records it, burn-fusion fuses it,
//! CubeCL launches it) and the GPU a launch. burn 0.21 composes these four from several
//! operations, each an autodiff node of its own with its own backward: layer norm (22 in a
//! `mini` step) is about ten nodes, and on lavapipe its derived backward launched about
//! twice the kernels of the closed form here (17 against 8); the loss's backward goes
//! through a scatter into a zero tensor of the logits' size. Here each is one node, and the
//! backward is the closed form the CPU's steps also use. On lavapipe a `narrow` step
//! launches 1,274 kernels against 1,610, and the host's work (perf samples, busy-waiting
//! left out: `bench/host_steps.sh`) is 0.72x burn's compositions'.
//!
//! `train_bench --burn-steps` keeps burn's compositions instead, so that one binary
//! measures both side by side.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::ops::IntTensor;
use burn::tensor::{Distribution, IndexingUpdateOp};

use super::*;

/// Set by [`use_burn_steps`]: burn's compositions on every backend.
static BURN_STEPS: AtomicBool = AtomicBool::new(false);

/// Whether GPU backends compose layer norm, softmax, dropout and the loss from burn's
/// operations (true) or take this module's single steps (false, the default). A
/// measurement switch.
pub fn use_burn_steps(on: bool) {
    BURN_STEPS.store(on, Ordering::Relaxed);
}

/// Cleared by [`use_attention_core`]: attention's core composed of burn's products on
/// strided views, with the softmax and dropout steps, as before [`AttentionCore`].
static ATTENTION_CORE: AtomicBool = AtomicBool::new(true);

/// Whether GPU backends take attention's core as one step ([`AttentionCore`], true, the
/// default) or compose it (false). A measurement switch, as [`use_burn_steps`] is.
pub fn use_attention_core(on: bool) {
    ATTENTION_CORE.store(on, Ordering::Relaxed);
}

/// A step written once for every autodiff backend `Autodiff<I, C>`.
pub(crate) trait Step {
    type Out;
    fn on<I: Backend, C: CheckpointStrategy>(self) -> Self::Out;
}

/// Runs `step` where `B` is one of this build's GPU backends under autodiff; gives it back
/// where it is not (the CPU has its own steps; inference has no autodiff).
pub(crate) fn on_gpu_autodiff<B: Backend, S: Step>(step: S) -> Result<S::Out, S> {
    if BURN_STEPS.load(Ordering::Relaxed) {
        return Err(step);
    }
    #[allow(unused_macros)]
    macro_rules! try_inner {
        ($inner:ty) => {
            if TypeId::of::<B>() == TypeId::of::<Autodiff<$inner>>() {
                return Ok(step.on::<$inner, NoCheckpointing>());
            }
            if TypeId::of::<B>() == TypeId::of::<Autodiff<$inner, BalancedCheckpointing>>() {
                return Ok(step.on::<$inner, BalancedCheckpointing>());
            }
        };
    }
    #[cfg(feature = "cuda")]
    {
        try_inner!(burn::backend::Cuda);
        try_inner!(crate::compute::UnfusedCuda);
    }
    #[cfg(feature = "wgpu")]
    {
        use burn::backend::wgpu::{CubeBackend, WgpuRuntime};
        try_inner!(burn::backend::Wgpu);
        try_inner!(CubeBackend<WgpuRuntime, f32, i32, u32>);
    }
    Err(step)
}

/// A float primitive of `I` as a tensor.
fn tensor<I: Backend, const D: usize>(x: FloatTensor<I>) -> Tensor<I, D> {
    Tensor::from_primitive(TensorPrimitive::Float(x))
}

fn primitive<I: Backend, const D: usize>(x: Tensor<I, D>) -> FloatTensor<I> {
    x.into_primitive().tensor()
}

/// A step's output, recorded with its backward and `state` where a parent needs a gradient
/// (the state is made only then), without them otherwise.
fn finish<BO, I, S, C, const N: usize>(
    prep: OpsKind<BO, I, S, C, N>,
    state: impl FnOnce() -> S,
    output: FloatTensor<I>,
) -> FloatTensor<Autodiff<I, C>>
where
    BO: Backward<I, N, State = S>,
    I: Backend,
    S: Clone + Send + std::fmt::Debug + 'static,
    C: CheckpointStrategy,
{
    match prep {
        OpsKind::Tracked(prep) => prep.finish(state(), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// An int tensor of `B` as the inner backend's (autodiff passes int tensors through
/// unchanged, so `B`'s int primitive is `I`'s).
fn inner_int<B: Backend, I: Backend, const D: usize>(x: Tensor<B, D, Int>) -> Tensor<I, D, Int> {
    let x: Box<dyn Any> = Box::new(x.into_primitive());
    let x = *x
        .downcast::<IntTensor<I>>()
        .unwrap_or_else(|_| unreachable!("autodiff's int primitive is its inner backend's"));
    Tensor::from_primitive(x)
}

/// `norm.forward(x)` over the last dimension of `x`, as one step with the textbook
/// backward.
pub(crate) struct Norm<B: Backend, const D: usize> {
    pub(crate) x: Tensor<B, D>,
    pub(crate) gamma: Tensor<B, 1>,
    pub(crate) beta: Tensor<B, 1>,
}

impl<B: Backend, const D: usize> Step for Norm<B, D> {
    type Out = Tensor<B, D>;

    fn on<I: Backend, C: CheckpointStrategy>(self) -> Tensor<B, D> {
        let x: FloatTensor<Autodiff<I, C>> = to_concrete(self.x);
        let gamma: FloatTensor<Autodiff<I, C>> = to_concrete(self.gamma);
        let beta: FloatTensor<Autodiff<I, C>> = to_concrete(self.beta);
        // Scale and shift seen as `[1, .., 1, d]` once, for the forward and the backward.
        let g: Tensor<I, D> = tensor::<I, 1>(gamma.primitive).unsqueeze();
        let b: Tensor<I, D> = tensor::<I, 1>(beta.primitive).unsqueeze();
        let x_in = tensor::<I, D>(x.primitive);
        let centered = x_in.clone() - x_in.mean_dim(D - 1);
        let rstd = centered
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(LAYER_NORM_EPS)
            .sqrt()
            .recip();
        let normalized = centered * rstd.clone();
        let y = normalized.clone() * g.clone() + b;
        let prep =
            Backward::<I, 3>::prepare::<C>(NormBackward::<D>, [x.node, gamma.node, beta.node])
                .compute_bound()
                .stateful();
        let y = finish(
            prep,
            || ([normalized, rstd].map(primitive), primitive(g)),
            primitive(y),
        );
        from_concrete::<B, _, D>(y)
    }
}

#[derive(Debug)]
struct NormBackward<const D: usize>;

impl<I: Backend, const D: usize> Backward<I, 3> for NormBackward<D> {
    /// `(x - mean) * rstd` `[.., d]` and `rstd` `[.., 1]`; gamma `[1, .., 1, d]`.
    type State = ([FloatTensor<I>; 2], FloatTensor<I>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ([normalized, rstd], gamma) = ops.state;
        let [x_node, gamma_node, beta_node] = ops.parents;
        let dy = tensor::<I, D>(grads.consume::<I>(&ops.node));
        let normalized = tensor::<I, D>(normalized);
        let d = normalized.dims()[D - 1];
        // Summed over every dimension but the last, as `[d]`: one reduction over the rows
        // (a sum per leading dimension, as burn's broadcast backward sums, launches D - 1).
        let rows = normalized.shape().num_elements() / d;
        let per_feature = |t: Tensor<I, D>| t.reshape([rows, d]).sum_dim(0).reshape([d]);
        // The element-wise products first, then every reduction, then the rest: burn-fusion
        // fuses runs of element-wise operations, and a reduction between two ends a run.
        let g = dy.clone() * tensor::<I, D>(gamma);
        let g_normalized = g.clone() * normalized.clone();
        let dy_normalized = gamma_node
            .is_some()
            .then(|| dy.clone() * normalized.clone());
        if let Some(node) = gamma_node {
            let dg = per_feature(dy_normalized.expect("made for gamma's gradient"));
            grads.register::<I>(node.id, primitive(dg));
        }
        if let Some(node) = beta_node {
            grads.register::<I>(node.id, primitive(per_feature(dy)));
        }
        if let Some(node) = x_node {
            let m1 = g.clone().mean_dim(D - 1);
            let m2 = g_normalized.mean_dim(D - 1);
            let dx = (g - m1 - normalized * m2) * tensor::<I, D>(rstd);
            grads.register::<I>(node.id, primitive(dx));
        }
    }
}

/// Attention's weights `softmax(scores / root + bias)` over the last dimension: one
/// [`Softmax`] step under autodiff on a GPU, burn's operations elsewhere.
pub fn attention_weights<B: Backend>(
    scores: Tensor<B, 4>,
    root: f32,
    bias: Tensor<B, 4>,
) -> Tensor<B, 4> {
    match on_gpu_autodiff::<B, _>(Softmax { scores, root, bias }) {
        Ok(weights) => weights,
        Err(Softmax { scores, root, bias }) => {
            burn::tensor::activation::softmax(scores.div_scalar(root) + bias, 3)
        }
    }
}

/// Attention's weights as one step. `bias` (masking) is a constant: no gradient flows
/// into it.
pub(crate) struct Softmax<B: Backend> {
    pub(crate) scores: Tensor<B, 4>,
    pub(crate) root: f32,
    pub(crate) bias: Tensor<B, 4>,
}

impl<B: Backend> Step for Softmax<B> {
    type Out = Tensor<B, 4>;

    fn on<I: Backend, C: CheckpointStrategy>(self) -> Tensor<B, 4> {
        let scores: FloatTensor<Autodiff<I, C>> = to_concrete(self.scores);
        let bias: FloatTensor<Autodiff<I, C>> = to_concrete(self.bias);
        let z =
            tensor::<I, 4>(scores.primitive).div_scalar(self.root) + tensor::<I, 4>(bias.primitive);
        let e = (z.clone() - z.max_dim(3)).exp();
        let y = e.clone() / e.sum_dim(3);
        let prep = Backward::<I, 1>::prepare::<C>(SoftmaxBackward, [scores.node])
            .compute_bound()
            .stateful();
        let y = finish(
            prep,
            || (primitive(y.clone()), self.root),
            primitive(y.clone()),
        );
        from_concrete::<B, _, 4>(y)
    }
}

#[derive(Debug)]
struct SoftmaxBackward;

impl<I: Backend> Backward<I, 1> for SoftmaxBackward {
    /// The weights `[batch, heads, query, key]` and the scale's root.
    type State = (FloatTensor<I>, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (y, root) = ops.state;
        unary::<I, _>(ops.parents, ops.node, grads, |dy| {
            let (y, dy) = (tensor::<I, 4>(y), tensor::<I, 4>(dy));
            let dot = (dy.clone() * y.clone()).sum_dim(3);
            primitive((y * (dy - dot)).div_scalar(root))
        });
    }
}

/// Multi-head attention's core on `q` `[batch, query, d]`, `k` and `v` `[batch, key, d]`:
/// one [`AttentionCore`] step under autodiff on a GPU; given back where it does not apply
/// (another backend, or a length under two: cubecl 0.10's one-row products, see
/// `model::matmul`).
pub(crate) fn attention_core<B: Backend>(
    qkv: [Tensor<B, 3>; 3],
    heads: usize,
    root: f32,
    bias: Tensor<B, 4>,
    dropout: f64,
) -> Result<Tensor<B, 3>, AttentionCore<B>> {
    let (t, s) = (qkv[0].dims()[1], qkv[1].dims()[1]);
    let step = AttentionCore {
        qkv,
        heads,
        root,
        bias,
        dropout,
    };
    if t < 2 || s < 2 || !ATTENTION_CORE.load(Ordering::Relaxed) {
        return Err(step);
    }
    on_gpu_autodiff::<B, _>(step)
}

/// `softmax(q k^T / root + bias)`, dropped out with probability `dropout`, times `v`, per
/// head, as one step: the heads are laid out `[batch, heads, time, dk]` once each way.
///
/// Why: composed of burn's operations, each product's operand is a strided view of the
/// projection (`[batch, time, heads, dk]` seen with heads and time swapped), which CubeCL's
/// products take only after copying it, and autodiff keeps the views, not the copies, for
/// the backward, whose products copy them again: twelve copies per attention and step, 144
/// in a `mini` step. Here the copies the products read are the ones kept, and every
/// backward product reads contiguous operands: eight copies. Softmax and dropout are this
/// step's too (one node instead of about ten).
pub(crate) struct AttentionCore<B: Backend> {
    pub(crate) qkv: [Tensor<B, 3>; 3],
    pub(crate) heads: usize,
    pub(crate) root: f32,
    /// `[batch or 1, 1, query or 1, key]`, a constant: no gradient flows into it.
    pub(crate) bias: Tensor<B, 4>,
    pub(crate) dropout: f64,
}

/// `x` `[batch, len, heads * dk]` as `[batch, heads, len, dk]`, laid out anew, times
/// `scale`: an element-wise product of the view with the heads and time swapped writes its
/// output contiguous, so the product is the copy (a reshape of the view, copying too,
/// measured one kernel more per attention on lavapipe, burn-fusion splitting the softmax
/// after it).
fn split_heads<I: Backend>(x: Tensor<I, 3>, heads: usize, scale: f32) -> Tensor<I, 4> {
    let [b, len, d] = x.dims();
    x.reshape([b, len, heads, d / heads])
        .swap_dims(1, 2)
        .mul_scalar(scale)
}

/// The way back from [`split_heads`]: `[batch, heads, len, dk]` as `[batch, len, d]`, times
/// `scale`.
fn merge_heads<I: Backend>(x: Tensor<I, 4>, scale: f32) -> Tensor<I, 3> {
    let [b, heads, len, dk] = x.dims();
    x.swap_dims(1, 2)
        .mul_scalar(scale)
        .reshape([b, len, heads * dk])
}

impl<B: Backend> Step for AttentionCore<B> {
    type Out = Tensor<B, 3>;

    fn on<I: Backend, C: CheckpointStrategy>(self) -> Tensor<B, 3> {
        let [q, k, v]: [FloatTensor<Autodiff<I, C>>; 3] = self.qkv.map(to_concrete);
        let bias: FloatTensor<Autodiff<I, C>> = to_concrete(self.bias);
        let h = self.heads;
        let heads = |x: &FloatTensor<Autodiff<I, C>>, scale| {
            split_heads(tensor::<I, 3>(x.primitive.clone()), h, scale)
        };
        // q scaled by 1 / root as it is laid out: the scores need no pass of their own.
        let (qs, kh, vh) = (heads(&q, self.root.recip()), heads(&k, 1.0), heads(&v, 1.0));
        let z = qs.clone().matmul(kh.clone().swap_dims(2, 3)) + tensor::<I, 4>(bias.primitive);
        let e = (z.clone() - z.max_dim(3)).exp();
        let weights = e.clone() / e.sum_dim(3);
        let keep = (self.dropout > 0.0).then(|| {
            let mask = weights.random_like(Distribution::Bernoulli(1.0 - self.dropout));
            let scale = 1.0 / (1.0 - self.dropout);
            let dropped = (weights.clone() * mask.clone()).mul_scalar(scale);
            (mask, scale, dropped)
        });
        let dropped = keep.as_ref().map_or(&weights, |(_, _, dropped)| dropped);
        let context = merge_heads(dropped.clone().matmul(vh.clone()), 1.0);
        let prep = Backward::<I, 3>::prepare::<C>(AttentionBackward, [q.node, k.node, v.node])
            .compute_bound()
            .stateful();
        let state = || AttentionState {
            heads: [qs, kh, vh].map(primitive),
            keep: keep.map(|(mask, scale, dropped)| (primitive(mask), scale, primitive(dropped))),
            weights: primitive(weights),
            root: self.root,
        };
        from_concrete::<B, _, 3>(finish(prep, state, primitive(context)))
    }
}

/// What [`AttentionBackward`] needs from the forward pass.
#[derive(Clone, Debug)]
struct AttentionState<I: Backend> {
    /// q / root, k and v, each `[batch, heads, time, dk]`.
    heads: [FloatTensor<I>; 3],
    /// The softmax's output `[batch, heads, query, key]`, before dropout.
    weights: FloatTensor<I>,
    /// Dropout's mask (1 kept, 0 dropped), `1 / keep`, and the weights after dropout (kept,
    /// as a product's operand is, rather than made again in the backward pass).
    keep: Option<(FloatTensor<I>, f64, FloatTensor<I>)>,
    root: f32,
}

#[derive(Debug)]
struct AttentionBackward;

impl<I: Backend> Backward<I, 3> for AttentionBackward {
    type State = AttentionState<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let AttentionState {
            heads: [qs, kh, vh],
            weights,
            keep,
            root,
        } = ops.state;
        let [q_node, k_node, v_node] = ops.parents;
        let (qs, kh, vh) = (tensor::<I, 4>(qs), tensor::<I, 4>(kh), tensor::<I, 4>(vh));
        let weights = tensor::<I, 4>(weights);
        let n_heads = qs.dims()[1];
        let d_context = split_heads(tensor::<I, 3>(grads.consume::<I>(&ops.node)), n_heads, 1.0);
        let (keep, dropped) = match keep {
            Some((mask, scale, dropped)) => (Some((tensor::<I, 4>(mask), scale)), tensor(dropped)),
            None => (None, weights.clone()),
        };
        if let Some(node) = v_node {
            let dv = dropped.swap_dims(2, 3).matmul(d_context.clone());
            grads.register::<I>(node.id, primitive(merge_heads(dv, 1.0)));
        }
        if q_node.is_none() && k_node.is_none() {
            return;
        }
        // Through the dropout, then the softmax (its textbook backward): the gradient of
        // the scores `q k^T / root + bias`.
        let mut d_weights = d_context.matmul(vh.swap_dims(2, 3));
        if let Some((mask, scale)) = keep {
            d_weights = (d_weights * mask).mul_scalar(scale);
        }
        let dot = (d_weights.clone() * weights.clone()).sum_dim(3);
        let dz = weights * (d_weights - dot);
        if let Some(node) = q_node {
            let dq = dz.clone().matmul(kh);
            grads.register::<I>(node.id, primitive(merge_heads(dq, root.recip())));
        }
        if let Some(node) = k_node {
            let dk = dz.swap_dims(2, 3).matmul(qs);
            grads.register::<I>(node.id, primitive(merge_heads(dk, 1.0)));
        }
    }
}

/// Each token's cross-entropy `[batch, time, 1]` from `logits` `[batch, time, vocab]` and
/// `targets` `[batch, time, 1]`, with label smoothing: `lse - (1 - s) * x[target] - s *
/// mean(x)`.
pub(crate) struct CrossEntropy<B: Backend> {
    pub(crate) logits: Tensor<B, 3>,
    pub(crate) targets: Tensor<B, 3, Int>,
    pub(crate) smoothing: f32,
}

impl<B: Backend> Step for CrossEntropy<B> {
    type Out = Tensor<B, 3>;

    fn on<I: Backend, C: CheckpointStrategy>(self) -> Tensor<B, 3> {
        let s = self.smoothing;
        let logits: FloatTensor<Autodiff<I, C>> = to_concrete(self.logits);
        let targets = inner_int::<B, I, 3>(self.targets);
        let x = tensor::<I, 3>(logits.primitive);
        let max = x.clone().max_dim(2);
        let lse = (x.clone() - max.clone()).exp().sum_dim(2).log() + max;
        let picked = x.clone().gather(2, targets.clone());
        let mut loss = lse.clone() - picked.mul_scalar(1.0 - s);
        if s > 0.0 {
            loss = loss - x.clone().mean_dim(2).mul_scalar(s);
        }
        let prep = Backward::<I, 1>::prepare::<C>(CrossEntropyBackward, [logits.node])
            .compute_bound()
            .stateful();
        let state = || ([primitive(x), primitive(lse)], targets.into_primitive(), s);
        from_concrete::<B, _, 3>(finish(prep, state, primitive(loss)))
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl<I: Backend> Backward<I, 1> for CrossEntropyBackward {
    /// The logits `[batch, time, vocab]` and their log-sum-exp `[batch, time, 1]`, the
    /// targets `[batch, time, 1]`, the smoothing.
    type State = ([FloatTensor<I>; 2], IntTensor<I>, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ([x, lse], targets, s) = ops.state;
        unary::<I, _>(ops.parents, ops.node, grads, |dy| {
            let (x, lse, dy) = (tensor::<I, 3>(x), tensor::<I, 3>(lse), tensor::<I, 3>(dy));
            let vocab = x.dims()[2];
            // softmax - s / vocab everywhere, then - (1 - s) at each token's target.
            let dx = (x - lse).exp().sub_scalar(s / vocab as f32) * dy.clone();
            let at_target = dy.mul_scalar(s - 1.0);
            primitive(dx.scatter(
                2,
                Tensor::from_primitive(targets),
                at_target,
                IndexingUpdateOp::Add,
            ))
        });
    }
}

/// Dropout of `x` with probability `prob` in training: one [`Dropout`] step under autodiff
/// on a GPU (burn's is two nodes, a product by the mask and one by `1 / keep`), burn's
/// layer elsewhere.
pub fn dropout<B: Backend, const D: usize>(
    layer: &burn::nn::Dropout,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    match on_gpu_autodiff::<B, _>(Dropout {
        x,
        prob: layer.prob,
    }) {
        Ok(y) => y,
        Err(Dropout { x, .. }) => layer.forward(x),
    }
}

/// `x * mask / keep`, the mask drawn from the backend's generator as burn's layer draws it,
/// and the same operations as burn's layer, forward and backward: burn-fusion fuses them
/// with their neighbours as it did (a mask scaled beforehand, kept for the backward, came
/// to 120 more launches a `narrow` step on lavapipe).
pub(crate) struct Dropout<B: Backend, const D: usize> {
    pub(crate) x: Tensor<B, D>,
    pub(crate) prob: f64,
}

impl<B: Backend, const D: usize> Step for Dropout<B, D> {
    type Out = Tensor<B, D>;

    fn on<I: Backend, C: CheckpointStrategy>(self) -> Tensor<B, D> {
        let x: FloatTensor<Autodiff<I, C>> = to_concrete(self.x);
        let scale = 1.0 / (1.0 - self.prob);
        let x_in = tensor::<I, D>(x.primitive);
        let mask = x_in.random_like(Distribution::Bernoulli(1.0 - self.prob));
        let y = (x_in * mask.clone()).mul_scalar(scale);
        // Kept, never recomputed: a second draw would be another mask.
        let prep = Backward::<I, 1>::prepare::<C>(DropoutBackward::<D>, [x.node])
            .compute_bound()
            .stateful();
        from_concrete::<B, _, D>(finish(prep, || (primitive(mask), scale), primitive(y)))
    }
}

#[derive(Debug)]
struct DropoutBackward<const D: usize>;

impl<I: Backend, const D: usize> Backward<I, 1> for DropoutBackward<D> {
    /// The mask (1 kept, 0 dropped) and `1 / keep`.
    type State = (FloatTensor<I>, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (mask, scale) = ops.state;
        unary::<I, _>(ops.parents, ops.node, grads, |dy| {
            primitive((tensor::<I, D>(dy) * tensor::<I, D>(mask)).mul_scalar(scale))
        });
    }
}
