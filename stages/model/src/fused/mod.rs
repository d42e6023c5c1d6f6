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
//! GPU backends (CUDA, where burn fuses element-wise work itself) keep burn's operations,
//! except that under autodiff layer norm, attention's softmax, dropout and the loss are
//! one step each there too, composed of the inner backend's operations (`gpu`): fewer operations
//! for the host to record and launch, which is what limits a GPU step.
//!
//! One file per step (`attention`, `product`, `loss`, `norm`, `dropout`, `gpu`; their tests against
//! burn's compositions in `tests`); here what they share: which backend takes the fused
//! path, moving tensors to and from flex's concrete type, and output buffers written by
//! several tasks at once.

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

mod attention;
mod dropout;
pub(crate) mod gpu;
mod loss;
mod norm;
mod product;
#[cfg(test)]
mod tests;

pub use attention::attention;
pub use dropout::{dropout, KeepMask};
pub use loss::cross_entropy;
pub use loss::sum as loss_sum;
pub use norm::layer_norm;
pub(crate) use norm::LAYER_NORM_EPS;
pub use product::product;
pub(crate) use product::{gemm_into, Operand};
// For the steps' modules (each starts with `use super::*`): what they share.
#[allow(unused_imports)]
use {attention::*, dropout::*, loss::*, norm::*, product::*};

/// A base pointer shared by the tasks of one step, each of which writes only its own part:
/// its (batch, head) slice of the scores, or its head's columns of its batch row.
#[derive(Clone, Copy)]
pub(crate) struct Shared(*mut f32);
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
pub(crate) fn owned(x: FlexTensor) -> FlexTensor {
    let mut x = from_start(x);
    if x.try_storage_mut::<f32>().is_none() {
        let n = x.layout().num_elements();
        let copy = x.storage::<f32>()[..n].to_vec();
        x = FlexTensor::from_data(TensorData::new(copy, x.layout().shape().clone()));
    }
    x
}

/// Which fused path `B` can take.
pub(crate) enum Path {
    /// Plain flex (evaluation): the forward pass alone.
    Forward,
    Autodiff {
        balanced: bool,
    },
}

pub(crate) fn path<B: Backend>() -> Option<Path> {
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
