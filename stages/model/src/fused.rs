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
use burn::tensor::activation;
use burn::tensor::ops::{ActivationOps, FloatTensor, FloatTensorOps};
use burn::tensor::TensorPrimitive;
use burn_flex::FlexTensor;

/// burn-autodiff's float tensor (its type is not exported by name).
type AutodiffTensor = FloatTensor<Autodiff<Flex>>;

/// Softmax over the last dimension.
pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let dim = D - 1;
    let Some(Path::Autodiff { balanced }) = path::<B>() else {
        return activation::softmax(x, dim);
    };
    if x.dtype() != burn::tensor::DType::F32 {
        return activation::softmax(x, dim);
    }
    let input: AutodiffTensor = to_concrete(x);
    let output = if balanced {
        fused_softmax::<BalancedCheckpointing>(input, dim)
    } else {
        fused_softmax::<NoCheckpointing>(input, dim)
    };
    from_concrete(output)
}

/// The softmax's backward step; its state is the forward output `y`.
#[derive(Debug)]
struct SoftmaxBackward {
    dim: usize,
}

impl Backward<Flex, 1> for SoftmaxBackward {
    type State = FloatTensor<Flex>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let y = ops.state;
        let dim = self.dim;
        unary::<Flex, _>(ops.parents, ops.node, grads, |dy| {
            let dot = Flex::float_sum_dim(Flex::float_mul(dy.clone(), y.clone()), dim);
            Flex::float_mul(y, Flex::float_sub(dy, dot))
        });
    }
}

fn fused_softmax<C: CheckpointStrategy>(x: AutodiffTensor, dim: usize) -> AutodiffTensor {
    // Compute-bound: the output is kept for the backward pass rather than recomputed, under
    // gradient checkpointing too (it is the state).
    let prep = SoftmaxBackward { dim }
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful();
    match prep {
        OpsKind::Tracked(prep) => {
            let y = Flex::softmax(x.primitive, dim);
            prep.finish(y.clone(), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(Flex::softmax(x.primitive, dim)),
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
    use burn::tensor::Distribution;

    /// The fused softmax's value and gradient against burn's decomposed one.
    fn check<A: burn::tensor::backend::AutodiffBackend>() {
        let device = Default::default();
        A::seed(&device, 7);
        let x = Tensor::<A, 4>::random([2, 3, 5, 7], Distribution::Normal(0.0, 2.0), &device)
            .require_grad();
        let w = Tensor::<A, 4>::random([2, 3, 5, 7], Distribution::Default, &device);
        let ours = softmax(x.clone());
        let burns = activation::softmax(x.clone(), 3);
        ours.to_data()
            .assert_approx_eq::<f32>(&burns.to_data(), burn::tensor::Tolerance::absolute(1e-6));
        let g_ours = (ours * w.clone()).sum().backward();
        let g_burn = (burns * w).sum().backward();
        x.grad(&g_ours).unwrap().to_data().assert_approx_eq::<f32>(
            &x.grad(&g_burn).unwrap().to_data(),
            burn::tensor::Tolerance::absolute(1e-6),
        );
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

    #[test]
    fn fused_softmax_matches_burns_value_and_gradient() {
        check::<Autodiff<Flex>>();
        check::<Autodiff<Flex, BalancedCheckpointing>>();
    }
}
