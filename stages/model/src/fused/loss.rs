//! Each target token's cross-entropy as one step.

use super::*;

/// Each target token's cross-entropy `[batch, target]` from `logits` `[batch, target,
/// vocab]`, with label smoothing `smoothing` (the target's share `1 - smoothing`, the rest
/// spread evenly): `lse - (1 - s) * x[target] - s * mean(x)`. One step of flex's on the
/// CPU, one of the inner backend's operations under autodiff on a GPU
/// ([`gpu::CrossEntropy`]). None where neither applies (inference on a GPU, not f32 on the
/// CPU); the caller then composes burn's operations.
pub fn cross_entropy<B: Backend>(
    logits: &Tensor<B, 3>,
    targets: &Tensor<B, 2, Int>,
    smoothing: f64,
) -> Option<Tensor<B, 2>> {
    let Some(path) = path::<B>() else {
        let [b, t, _] = logits.dims();
        let step = gpu::CrossEntropy {
            logits: logits.clone(),
            targets: targets.clone().reshape([b, t, 1]),
            smoothing: smoothing as f32,
        };
        return gpu::on_gpu_autodiff::<B, _>(step)
            .ok()
            .map(|loss| loss.reshape([b, t]));
    };
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

pub(crate) fn ce_tensor(values: Vec<f32>, shape: [usize; 2]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Per row of a contiguous `[.., vocab]` tensor: the loss and the log-sum-exp.
pub(crate) fn ce_forward(x: &FlexTensor, targets: &[i64], smoothing: f32) -> (Vec<f32>, Vec<f32>) {
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
pub(crate) struct CeState {
    pub(crate) logits: FlexTensor,
    pub(crate) targets: Arc<Vec<i64>>,
    pub(crate) lse: Arc<Vec<f32>>,
    pub(crate) smoothing: f32,
}

#[derive(Debug)]
pub(crate) struct CrossEntropyBackward;

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

pub(crate) fn fused_ce<C: CheckpointStrategy>(
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

/// The sum of a loss's values `[batch, target]` (padding already zeroed) as a `[1]` tensor,
/// in an order fixed by this code (f64, over [`rowmath::sum_of_squares`]'s eight lanes):
/// flex's own sum runs as many lanes as the machine's vectors have, so the loss a training
/// logs (and stores in `training.json`) differed in its last bits from machine to machine.
/// Its backward is the incoming gradient, spread over every value. None where the CPU's
/// fused path does not apply (the caller then sums with burn).
pub fn sum<B: Backend>(x: &Tensor<B, 2>) -> Option<Tensor<B, 1>> {
    let path = path::<B>()?;
    if x.dtype() != burn::tensor::DType::F32 {
        return None;
    }
    Some(match path {
        Path::Forward => {
            let x: FlexTensor = to_concrete(x.clone());
            from_concrete::<B, _, 1>(sum_tensor(&x))
        }
        Path::Autodiff { balanced } => {
            let x: AutodiffTensor = to_concrete(x.clone());
            let out = if balanced {
                fused_sum::<BalancedCheckpointing>(x)
            } else {
                fused_sum::<NoCheckpointing>(x)
            };
            from_concrete::<B, _, 1>(out)
        }
    })
}

fn sum_tensor(x: &FlexTensor) -> FlexTensor {
    let x = from_start(x.clone());
    let n = x.layout().num_elements();
    let total = rowmath::sum_f64(&x.storage::<f32>()[..n]) as f32;
    FlexTensor::from_data(TensorData::new(vec![total], [1]))
}

#[derive(Debug)]
pub(crate) struct SumBackward;

impl Backward<Flex, 1> for SumBackward {
    /// The summed tensor's shape.
    type State = burn::tensor::Shape;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let shape = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |dy| {
            let dy = from_start(dy).storage::<f32>()[0];
            FlexTensor::from_data(TensorData::new(vec![dy; shape.num_elements()], shape))
        });
    }
}

fn fused_sum<C: CheckpointStrategy>(x: AutodiffTensor) -> AutodiffTensor {
    let prep = SumBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful();
    let out = sum_tensor(&x.primitive);
    match prep {
        OpsKind::Tracked(prep) => prep.finish(x.primitive.layout().shape().clone(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}
