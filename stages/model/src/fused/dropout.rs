//! Dropout with a mask made where it is used, never stored.

use super::*;

/// Dropout's keep mask, made where it is used instead of stored: value `i` is kept (and
/// scaled by `1 / keep`) when a hash of `i` and the key falls below `keep * 2^32`. The
/// forward and backward passes make the same mask from the key; nothing of the size of the
/// tensor is drawn, written or kept between them. The same values whatever the thread count.
#[derive(Clone, Copy, Debug)]
pub struct KeepMask {
    pub(crate) keys: [u32; 2],
    pub(crate) below: u32,
    pub(crate) scale: f32,
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
    pub(crate) fn apply_from(&self, offset: usize, values: &mut [f32]) {
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
        let (shape, device, dtype) = (x.shape(), x.device(), x.dtype());
        let values = mask.values(shape.num_elements());
        let mut mask = Tensor::<B, D>::from_data(TensorData::new(values, shape), &device);
        // Mixed precision's activations are bf16: the mask in their dtype, so that the
        // product stays in it.
        if mask.dtype() != dtype {
            mask = mask.cast(burn::tensor::FloatDType::from(dtype));
        }
        x * mask
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
pub(crate) fn masked(x: FlexTensor, mask: KeepMask) -> FlexTensor {
    let mut x = owned(x);
    let n = x.layout().num_elements();
    mask.apply(&mut x.try_storage_mut::<f32>().expect("owned")[..n]);
    x
}

#[derive(Debug)]
pub(crate) struct DropoutBackward;

impl Backward<Flex, 1> for DropoutBackward {
    type State = KeepMask;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let mask = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |dy| masked(dy, mask));
    }
}

pub(crate) fn fused_dropout<C: CheckpointStrategy>(
    x: AutodiffTensor,
    mask: KeepMask,
) -> AutodiffTensor {
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
