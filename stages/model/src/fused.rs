//! Operations that burn's autodiff backend splits into several, given one step of their own
//! on the CPU. Under `Autodiff`, burn 0.21 computes a softmax as five operations (max,
//! subtract, exp, sum, divide, each with its own backward and its own pass over the
//! attention scores, the broadcasts through a slow strided path in burn-flex), although flex
//! has a fused softmax. Here the forward pass is flex's fused kernel, and the backward pass
//! the softmax's own Jacobian product, `dx = y * (dy - sum(dy * y))`, from the saved output.
//! Other backends (CUDA, where burn fuses element-wise work itself) keep burn's softmax.

use std::any::{Any, TypeId};

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

/// burn-autodiff's float tensor (its type is not exported by name).
type AutodiffTensor = FloatTensor<Autodiff<Flex>>;

/// Softmax over the last dimension.
pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let dim = D - 1;
    let b = TypeId::of::<B>();
    let plain = b == TypeId::of::<Autodiff<Flex>>();
    let balanced = b == TypeId::of::<Autodiff<Flex, BalancedCheckpointing>>();
    if !(plain || balanced) || x.dtype() != burn::tensor::DType::F32 {
        return activation::softmax(x, dim);
    }
    // `B` is one of the two types above, so its float primitive is `AutodiffTensor`:
    // moved through `Any` to the concrete type and back.
    let mut primitive = Some(x.into_primitive().tensor());
    let input = (&mut primitive as &mut dyn Any)
        .downcast_mut::<Option<AutodiffTensor>>()
        .and_then(Option::take)
        .expect("the float primitive of Autodiff<Flex> is AutodiffTensor");
    let output = if plain {
        fused_softmax::<NoCheckpointing>(input, dim)
    } else {
        fused_softmax::<BalancedCheckpointing>(input, dim)
    };
    let output: Box<dyn Any> = Box::new(output);
    let output = *output
        .downcast::<FloatTensor<B>>()
        .unwrap_or_else(|_| unreachable!("same type as the input primitive"));
    Tensor::from_primitive(TensorPrimitive::Float(output))
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

fn fused_softmax<C: CheckpointStrategy>(
    x: AutodiffTensor,
    dim: usize,
) -> AutodiffTensor {
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

    #[test]
    fn fused_softmax_matches_burns_value_and_gradient() {
        check::<Autodiff<Flex>>();
        check::<Autodiff<Flex, BalancedCheckpointing>>();
    }
}
