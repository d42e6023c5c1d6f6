//! Layer normalisation as one step with the textbook backward.

use super::*;

/// burn's layer-norm epsilon (the default of every norm the model builds; its field is
/// private, the test below checks that the fused norm matches burn's).
pub(crate) const LAYER_NORM_EPS: f32 = 1e-5;

/// Rows per block of the parameter-gradient sums: blocks are summed in parallel, then in
/// order, so the result does not depend on how threads split the work.
pub(crate) const NORM_BLOCK: usize = 64;

/// `norm.forward(x)`, as one fused step under autodiff on the CPU, and as one step composed
/// of the inner backend's operations under autodiff on a GPU ([`gpu::Norm`]).
pub fn layer_norm<B: Backend, const D: usize>(
    norm: &burn::nn::LayerNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let Some(Path::Autodiff { balanced }) = path::<B>() else {
        return gpu_layer_norm(norm, x);
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

/// [`gpu::Norm`] where it applies (a GPU backend under autodiff, a norm with a bias),
/// burn's norm elsewhere.
fn gpu_layer_norm<B: Backend, const D: usize>(
    norm: &burn::nn::LayerNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let (Some(beta), true) = (&norm.beta, x.shape().num_elements() > 0) else {
        return norm.forward(x);
    };
    let step = gpu::Norm {
        x,
        gamma: norm.gamma.val(),
        beta: beta.val(),
    };
    match gpu::on_gpu_autodiff::<B, _>(step) {
        Ok(y) => y,
        Err(step) => norm.forward(step.x),
    }
}

#[derive(Clone, Debug)]
pub(crate) struct NormState {
    /// `(x - mean) / std`, flat.
    pub(crate) normalized: Arc<Vec<f32>>,
    pub(crate) rstd: Arc<Vec<f32>>,
    pub(crate) gamma: FlexTensor,
}

#[derive(Debug)]
pub(crate) struct LayerNormBackward;

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

pub(crate) fn fused_norm<C: CheckpointStrategy>(
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
