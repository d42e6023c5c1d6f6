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

// A build with no GPU backend (the CPU-only main job) has no type to take these steps.
#![cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]

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

/// A step written once for every autodiff backend `Autodiff<I, C>`.
pub(crate) trait Step {
    type Out;
    fn on<I: Backend, C: CheckpointStrategy>(self) -> Self::Out;
}

/// Runs `step` where `B` is one of this build's GPU backends under autodiff; gives it back
/// where it is not (the CPU has its own steps; inference has no autodiff).
#[cfg_attr(
    not(any(feature = "cuda", feature = "wgpu")),
    allow(clippy::extra_unused_type_parameters)
)]
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
    crate::compute::for_each_gpu_backend!(try_inner);
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
