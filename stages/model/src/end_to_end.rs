//! Vectors laid end to end in one kernel on GPU backends.
//!
//! [`crate::adamw::FlatAdamW`] lays every parameter and every gradient end to end each
//! step (174 tensors each for `mini`). burn's `Tensor::cat` is one operation for autodiff
//! and burn-fusion, but CubeCL runs it as one slice-assign kernel per piece: 348 of a
//! `narrow` step's 1,225 launches on lavapipe (`bench/results/launches.md`), each costing
//! the device thread its launch work and the GPU a launch. Here it is one kernel: every unit
//! walks every piece with a grid-sized stride, writing at the piece's offset, which each
//! unit sums from the pieces' lengths as it goes (no offsets table to upload).
//!
//! Under burn-fusion the kernel is a custom operation (as burn-vision registers its own):
//! fusion sees one operation that it does not fuse, as it did `cat`. A backend may bind only
//! so many buffers to one kernel (a Vulkan device's storage-buffer limit; CUDA allows
//! 1,024), so the pieces go in groups that fit, each one launch.
//!
//! Other backends (the CPU's) keep `Tensor::cat`; so does every backend after
//! [`use_burn_cat`], a measurement switch (`train_bench --burn-cat`).

use std::any::TypeId;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::prelude::*;

/// Set by [`use_burn_cat`].
static BURN_CAT: AtomicBool = AtomicBool::new(false);

/// Whether GPU backends lay vectors end to end with burn's `Tensor::cat` (true) or with
/// this module's kernel (false, the default). A measurement switch.
pub fn use_burn_cat(on: bool) {
    BURN_CAT.store(on, Ordering::Relaxed);
}

/// `pieces` (1-D, one dtype, at least one) end to end, as `Tensor::cat(pieces, 0)`.
pub fn lay_end_to_end<B: Backend>(pieces: Vec<Tensor<B, 1>>) -> Tensor<B, 1> {
    if BURN_CAT.load(Ordering::Relaxed) || pieces.len() < 2 {
        return Tensor::cat(pieces, 0);
    }
    #[allow(unused_macros)]
    macro_rules! try_backend {
        ($backend:ty) => {
            if TypeId::of::<B>() == TypeId::of::<$backend>() {
                let pieces = pieces
                    .into_iter()
                    .map(crate::fused::to_concrete::<B, _, 1>)
                    .collect();
                let out = <$backend as cube::EndToEnd>::end_to_end(pieces);
                return crate::fused::from_concrete::<B, _, 1>(out);
            }
        };
    }
    crate::compute::for_each_gpu_backend!(try_backend);
    let _ = TypeId::of::<B>; // used only by GPU builds
    Tensor::cat(pieces, 0)
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod cube {
    use burn::tensor::ops::{FloatTensor, FloatTensorOps};
    use burn::tensor::{DType, Shape};
    use burn_cubecl::element::{BoolElement, FloatElement, IntElement};
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{CubeBackend, CubeRuntime};
    use burn_fusion::stream::{Operation, OperationStreams};
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
    use cubecl::calculate_cube_count_elemwise;
    use cubecl::prelude::*;

    /// A backend that lays 1-D float tensors end to end in one operation.
    pub(super) trait EndToEnd: burn::tensor::backend::Backend {
        fn end_to_end(pieces: Vec<FloatTensor<Self>>) -> FloatTensor<Self>;
    }

    /// Each unit copies the elements `ABSOLUTE_POS`, `ABSOLUTE_POS + units`, ... of every
    /// piece, which are contiguous, to `output` after the pieces before it.
    #[cube(launch)]
    fn end_to_end_kernel<E: Numeric>(
        pieces: &Sequence<Tensor<E>>,
        output: &mut Tensor<E>,
        start: usize,
    ) {
        let units = CUBE_COUNT * CUBE_DIM as usize;
        let mut offset = start;
        #[unroll]
        for i in 0..comptime!(pieces.len()) {
            let piece = pieces.index(i);
            let n = piece.len();
            let mut at = ABSOLUTE_POS;
            while at < n {
                output[offset + at] = piece[at];
                at += units;
            }
            offset += n;
        }
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> EndToEnd
        for CubeBackend<R, F, I, BT>
    {
        fn end_to_end(pieces: Vec<CubeTensor<R>>) -> CubeTensor<R> {
            let first = &pieces[0];
            let (client, device, dtype) = (first.client.clone(), first.device.clone(), first.dtype);
            let total: usize = pieces.iter().map(|p| p.meta.num_elements()).sum();
            let output = empty_device_contiguous_dtype(client, device, Shape::new([total]), dtype);
            match dtype {
                DType::F32 => launch::<f32, R>(pieces, &output),
                DType::BF16 => launch::<half::bf16, R>(pieces, &output),
                DType::F16 => launch::<half::f16, R>(pieces, &output),
                // No parameter of this crate's comes in another dtype; burn's way serves.
                _ => return Self::float_cat(pieces, 0),
            }
            output
        }
    }

    /// Launches the kernel over `pieces` (of element type `E`) into `output`, in groups
    /// of as many as one kernel may bind.
    fn launch<E: Numeric, R: CubeRuntime>(pieces: Vec<CubeTensor<R>>, output: &CubeTensor<R>) {
        let client = &output.client;
        // One binding is the output's; CubeCL's count leaves room for the backend's own.
        // (lavapipe allows some thirty; CUDA, a `mini` step's 174 pieces at once.)
        let group = (client.properties().hardware.max_bindings as usize)
            .saturating_sub(1)
            .clamp(1, 256);
        let mut start = 0;
        let mut pieces = pieces.into_iter().peekable();
        while pieces.peek().is_some() {
            let mut args = SequenceArg::<R, Tensor<E>>::new();
            let (mut length, mut largest) = (0, 1);
            for piece in pieces.by_ref().take(group) {
                let piece = if piece.is_contiguous() {
                    piece
                } else {
                    into_contiguous(piece)
                };
                let n = piece.meta.num_elements();
                (length, largest) = (length + n, largest.max(n));
                args.push(piece.into_tensor_arg());
            }
            // Enough units for the group's largest piece to take a few strides, not one
            // per element: its smaller pieces leave most units idle.
            let units = largest.div_ceil(4);
            let cube_dim = CubeDim::new(client, units);
            let cube_count = calculate_cube_count_elemwise(client, units, cube_dim);
            end_to_end_kernel::launch::<E, R>(
                client,
                cube_count,
                cube_dim,
                args,
                output.clone().into_tensor_arg(),
                start,
            );
            start += length;
        }
    }

    /// burn-fusion's side: one custom operation whose execution is the inner backend's.
    #[derive(Debug)]
    struct EndToEndOp<B> {
        desc: CustomOpIr,
        _backend: std::marker::PhantomData<B>,
    }

    impl<B: FusionBackend + EndToEnd> Operation<B::FusionRuntime> for EndToEndOp<B> {
        fn execute(
            &self,
            handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
        ) {
            let pieces = self
                .desc
                .inputs
                .iter()
                .map(|piece| handles.get_float_tensor::<B>(piece))
                .collect();
            let out = B::end_to_end(pieces);
            handles.register_float_tensor::<B>(&self.desc.outputs[0].id, out);
        }
    }

    impl<B: FusionBackend + EndToEnd> EndToEnd for Fusion<B> {
        fn end_to_end(pieces: Vec<FloatTensor<Self>>) -> FloatTensor<Self> {
            let streams = OperationStreams::with_inputs(&pieces);
            let client = pieces[0].client.clone();
            let dtype = pieces[0].dtype;
            let total: usize = pieces.iter().map(|p| p.shape.num_elements()).sum();
            let inputs: Vec<TensorIr> = pieces.into_iter().map(|p| p.into_ir()).collect();
            let out = TensorIr::uninit(client.create_empty_handle(), Shape::new([total]), dtype);
            let desc = CustomOpIr::new("end_to_end", &inputs, &[out]);
            client
                .register(
                    streams,
                    OperationIr::Custom(desc.clone()),
                    EndToEndOp::<B> {
                        desc,
                        _backend: std::marker::PhantomData,
                    },
                )
                .output()
        }
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use super::*;
    use burn::backend::wgpu::{CubeBackend, WgpuRuntime};
    use burn::backend::Wgpu;
    use burn::tensor::{DType, FloatDType};

    /// Pieces of every kind `FlatAdamW` meets: lengths that are and are not multiples of
    /// the vector widths, a matrix flattened, a slice that starts inside its buffer, and a
    /// transposed matrix flattened (a copy, laid out afresh).
    fn pieces<B: Backend>(device: &B::Device) -> Vec<Tensor<B, 1>> {
        let values = |n: usize, k: usize| {
            let v: Vec<f32> = (0..n).map(|i| (i * 7 + k * 1000) as f32 * 0.25).collect();
            Tensor::<B, 1>::from_data(TensorData::new(v, [n]), device)
        };
        let matrix = values(12, 3).reshape([3, 4]);
        vec![
            values(5, 0),
            values(1, 1),
            values(1024, 2),
            matrix.clone().reshape([12]),
            values(40, 4).slice(3..37),
            matrix.transpose().reshape([12]),
            values(3001, 5),
        ]
    }

    fn same_as_cat<B: Backend>(dtype: FloatDType) {
        let device = Default::default();
        let cast = |p: Vec<Tensor<B, 1>>| p.into_iter().map(|t| t.cast(dtype)).collect();
        let ours = lay_end_to_end::<B>(cast(pieces(&device)));
        let burns = Tensor::cat(cast(pieces(&device)), 0);
        assert_eq!(ours.dtype(), DType::from(dtype));
        assert_eq!(ours.dims(), burns.dims());
        let ours = ours
            .cast(FloatDType::F32)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let burns = burns
            .cast(FloatDType::F32)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        // Element by element: a copy, so bit for bit.
        assert!(ours
            .iter()
            .zip(&burns)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn one_kernel_lays_pieces_as_cat_does() {
        same_as_cat::<Wgpu>(FloatDType::F32);
        same_as_cat::<Wgpu>(FloatDType::F16);
        same_as_cat::<CubeBackend<WgpuRuntime, f32, i32, u32>>(FloatDType::F32);
    }

    #[test]
    fn more_pieces_than_one_kernel_binds() {
        // 300 pieces: more than one launch's group (at most 256), so the offsets carry
        // from one launch to the next.
        let device = Default::default();
        let pieces = |k: usize| -> Vec<Tensor<Wgpu, 1>> {
            (0..300)
                .map(|i| {
                    let v: Vec<f32> = (0..(i % 7 + 1)).map(|j| (i * 10 + j + k) as f32).collect();
                    let n = v.len();
                    Tensor::from_data(TensorData::new(v, [n]), &device)
                })
                .collect()
        };
        let ours = lay_end_to_end(pieces(0))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let burns = Tensor::cat(pieces(0), 0)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(ours, burns);
    }
}
