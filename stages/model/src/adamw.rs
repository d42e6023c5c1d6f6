//! AdamW over every parameter at once, for GPU backends.
//!
//! burn's AdamW updates one parameter tensor at a time: about a dozen tensor operations for
//! each of `mini`'s 174 tensors, some two thousand operations per step that burn's autodiff,
//! fusion and CubeCL launch paths each handle on the host, which is what paces a GPU step
//! (measured on an H100: the process's CPU time 2.0–2.4x the step's wall time). This one
//! lays the parameters and gradients end to end in one vector each (one kernel each on GPU
//! backends: `end_to_end`) and runs the same arithmetic once over them (what PyTorch's
//! `AdamW(fused=True)` does on CUDA), then hands each parameter its slice back.
//!
//! The arithmetic is burn's `AdamW` (0.21) operation for operation, element by element, so
//! the parameters it produces are bit-identical to burn's (a test checks it on the CPU).
//! One difference: a parameter without a gradient is updated with a zero one (its moments
//! decay and weight decay applies) where burn leaves it alone; every parameter of this
//! crate's model gets a gradient in every step.
//!
//! The CPU keeps burn's optimiser: there each operation costs its arithmetic, not a launch
//! (and this one would copy every parameter out of the updated vector, see `Scatter`).
//!
//! Mixed precision: [`FlatAdamW::cast_copy`] gives the network to compute a step with, its
//! parameters cast in one operation from the master vector the last update produced, not
//! one cast per parameter forward and one per gradient backward: 348 operations a `mini`
//! step that autodiff, burn-fusion and CubeCL each handle, the first suspect for bf16
//! training slower than f32 on an H100 (`bench/results/gpu.md`).

use burn::module::ParamId;
use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, MultiGradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::FloatDType;

use crate::end_to_end::lay_end_to_end;
use crate::model::Seq2Seq;

/// First and second moments over every parameter end to end, and the step count.
type Moments<B> = (Tensor<B, 1>, Tensor<B, 1>, usize);

/// AdamW's hyperparameters, one value for both optimisers (burn's for the CPU,
/// [`FlatAdamW`] for GPUs), so that they cannot drift apart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWSettings {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

impl AdamWSettings {
    /// burn's `AdamWConfig` defaults (betas 0.9 and 0.999, epsilon 1e-5) with this weight
    /// decay.
    pub fn with_weight_decay(weight_decay: f32) -> Self {
        AdamWSettings {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-5,
            weight_decay,
        }
    }

    /// burn's AdamW with these settings.
    pub fn burn(self) -> AdamWConfig {
        AdamWConfig::new()
            .with_beta_1(self.beta_1)
            .with_beta_2(self.beta_2)
            .with_epsilon(self.epsilon)
            .with_weight_decay(self.weight_decay)
    }
}

/// See the module's documentation. It keeps only the moments between steps, so the
/// parameters it is given may have been changed in between (loaded from a file, say).
#[derive(Clone)]
pub struct FlatAdamW<A: AutodiffBackend> {
    settings: AdamWSettings,
    moments: Option<Moments<A::InnerBackend>>,
    /// The dtype steps compute in, once [`FlatAdamW::cast_copy`] has asked for one: each
    /// update then also casts the parameters it produced to it, into `cast`.
    compute: Option<FloatDType>,
    /// The last update's parameters end to end, in `compute`'s dtype; taken by the next
    /// `cast_copy`.
    cast: Option<Tensor<A::InnerBackend, 1>>,
}

impl<A: AutodiffBackend> FlatAdamW<A> {
    pub fn new(settings: AdamWSettings) -> Self {
        FlatAdamW {
            settings,
            moments: None,
            compute: None,
            cast: None,
        }
    }

    /// The network to compute a step in `dtype` with: `model`'s parameters as new trainable
    /// leaves in `dtype`, with the same ids, cut from one vector. Take the step's gradients
    /// from it (`GradientsParams::from_grads(loss.backward(), &copy)`): they arrive in
    /// `dtype`, and [`FlatAdamW::update`] lays them end to end and casts them back to the
    /// master parameters' dtype in one operation.
    ///
    /// After the first step the vector is the cast the last update made of its own output,
    /// so `model` must be the model that update returned (as in a training loop; `new` and
    /// `load_record` start afresh). Otherwise, and on the first step, `model`'s parameters
    /// are laid end to end and cast here.
    pub fn cast_copy(&mut self, model: &Seq2Seq<A>, dtype: FloatDType) -> Seq2Seq<A> {
        self.compute = Some(dtype);
        let count = model.num_params();
        let flat = match self.cast.take() {
            Some(flat) if flat.dims()[0] == count && flat.dtype() == dtype.into() => flat,
            _ => {
                let mut params = Vec::new();
                model.visit(&mut Flatten::<A>(&mut params));
                lay_end_to_end(params).cast(dtype)
            }
        };
        model.clone().map(&mut Scatter::<A>::new(flat))
    }
}

/// Every float parameter's value, flattened, in visiting order.
pub(crate) struct Flatten<'a, A: AutodiffBackend>(
    pub(crate) &'a mut Vec<Tensor<A::InnerBackend, 1>>,
);

impl<A: AutodiffBackend> ModuleVisitor<A> for Flatten<'_, A> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
        let value = param.val().inner();
        let n = value.shape().num_elements();
        self.0.push(value.reshape([n]));
    }
}

/// Gradients from one device, or from several (burn's multi-device training, summed on the
/// parameter's device).
pub enum Grads {
    One(GradientsParams),
    Several(MultiGradientsParams),
}

impl Grads {
    fn remove<B: Backend, const D: usize>(
        &mut self,
        id: ParamId,
        device: &B::Device,
    ) -> Option<Tensor<B, D>> {
        match self {
            Grads::One(grads) => grads.remove::<B, D>(id),
            Grads::Several(grads) => grads.remove::<B, D>(id).map(|(g, _)| g.to_device(device)),
        }
    }
}

/// Every parameter and its gradient (where it has one), flattened, in the model's visiting
/// order.
struct Gather<'a, A: AutodiffBackend> {
    grads: &'a mut Grads,
    params: Vec<Tensor<A::InnerBackend, 1>>,
    gradients: Vec<Option<Tensor<A::InnerBackend, 1>>>,
}

impl<A: AutodiffBackend> ModuleVisitor<A> for Gather<'_, A> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
        let value = param.val().inner();
        let n = value.shape().num_elements();
        let grad = self
            .grads
            .remove::<A::InnerBackend, D>(param.id, &value.device());
        self.params.push(value.reshape([n]));
        self.gradients.push(grad.map(|g| g.reshape([n])));
    }
}

/// The gradients end to end in the parameters' dtype, a zero one for each parameter without
/// one. Gradients taken from a [`FlatAdamW::cast_copy`] arrive in its dtype: they are laid
/// end to end in it and cast once.
fn flat_gradients<B: Backend>(
    params: &[Tensor<B, 1>],
    gradients: Vec<Option<Tensor<B, 1>>>,
) -> Tensor<B, 1> {
    let master = params[0].dtype();
    let dtype = gradients
        .iter()
        .flatten()
        .map(|g| g.dtype())
        .next()
        .unwrap_or(master);
    let pieces = gradients
        .into_iter()
        .zip(params)
        .map(|(g, p)| g.unwrap_or_else(|| p.zeros_like().cast(FloatDType::from(dtype))))
        .collect();
    let flat = lay_end_to_end(pieces);
    if dtype == master {
        flat
    } else {
        flat.cast(FloatDType::from(master))
    }
}

/// Each parameter's slice of `flat` (the updated vector; or, for data parallelism, the
/// parameters laid end to end and moved to another device), in the same order: a new leaf
/// with the same id, trainable where the original is.
pub(crate) struct Scatter<A: AutodiffBackend> {
    flat: Tensor<A::InnerBackend, 1>,
    offset: usize,
}

impl<A: AutodiffBackend> Scatter<A> {
    pub(crate) fn new(flat: Tensor<A::InnerBackend, 1>) -> Self {
        Scatter { flat, offset: 0 }
    }
}

impl<A: AutodiffBackend> ModuleMapper<A> for Scatter<A> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<A, D>>) -> Param<Tensor<A, D>> {
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let n = shape.num_elements();
        let piece = self
            .flat
            .clone()
            .slice(self.offset..self.offset + n)
            .reshape(shape);
        self.offset += n;
        // On the CPU each parameter gets a buffer of its own: the fused products and
        // attention take their fast path only on tensors that start at offset 0 (a slice
        // would take burn's operations, whose sums round differently). GPU kernels read
        // slices at any offset as fast.
        let piece = if crate::fused::on_cpu::<A>() {
            let device = piece.device();
            crate::train::host_copy(piece, &device)
        } else {
            piece
        };
        let mut updated = Tensor::from_inner(piece);
        if tensor.is_require_grad() {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

impl<A: AutodiffBackend> Optimizer<Seq2Seq<A>, A> for FlatAdamW<A> {
    type Record = Option<(Tensor<A, 1>, Tensor<A, 1>, usize)>;

    fn step(&mut self, lr: f64, module: Seq2Seq<A>, grads: GradientsParams) -> Seq2Seq<A> {
        self.update(lr, module, Grads::One(grads), None).0
    }

    fn step_multi(
        &mut self,
        lr: f64,
        module: Seq2Seq<A>,
        grads: MultiGradientsParams,
    ) -> Seq2Seq<A> {
        self.update(lr, module, Grads::Several(grads), None).0
    }

    fn to_record(&self) -> Self::Record {
        self.moments.as_ref().map(|(m, v, t)| {
            (
                Tensor::from_inner(m.clone()),
                Tensor::from_inner(v.clone()),
                *t,
            )
        })
    }

    fn load_record(mut self, record: Self::Record) -> Self {
        self.moments = record.map(|(m, v, t)| (m.inner(), v.inner(), t));
        self.cast = None;
        self
    }
}

impl<A: AutodiffBackend> FlatAdamW<A> {
    /// One step; with `clip`, the gradients are first clipped to that global norm (none
    /// where it is 0) and the norm before clipping is returned, left on the device.
    pub fn update(
        &mut self,
        lr: f64,
        module: Seq2Seq<A>,
        mut grads: Grads,
        clip: Option<f64>,
    ) -> (Seq2Seq<A>, Option<Tensor<A::InnerBackend, 1>>) {
        let mut gather = Gather::<A> {
            grads: &mut grads,
            params: Vec::new(),
            gradients: Vec::new(),
        };
        module.visit(&mut gather);
        let Gather {
            params, gradients, ..
        } = gather;
        if params.is_empty() {
            return (module, None);
        }
        // The parameters are laid end to end again every step. Keeping last step's vector
        // and updating it in place of this copy (174 fewer copies a `mini` step) was tried
        // and measured slower on an H100 (medians of five alternating rounds, 2026-11-27,
        // bench/results/gpu.md): 151k against 179k tokens/s, and 171k against 217k with
        // the loss read every step.
        let mut g = flat_gradients(&params, gradients);
        let p = lay_end_to_end(params);
        let mut norm = None;
        if let Some(max) = clip {
            let n = g.clone().powi_scalar(2).sum().sqrt();
            if max > 0.0 {
                // As `train::clip_global` does on the host (scaled by max / (norm + 1e-6)
                // where the norm exceeds max), decided on the device: reading the norm
                // back would make every step wait for the device to finish the last.
                let scale = n.clone().add_scalar(1e-6).recip().mul_scalar(max);
                let scale = scale.mask_fill(n.clone().lower_equal_elem(max), 1.0);
                g = g * scale;
            }
            norm = Some(n);
        }
        // burn's AdaptiveMomentumW::transform, then AdamW::step, on the whole vector.
        let AdamWSettings {
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
        } = self.settings;
        let (factor_1, factor_2) = (1.0 - beta_1, 1.0 - beta_2);
        let (m, v, time) = match self.moments.take() {
            Some((m, v, time)) => (
                m.mul_scalar(beta_1).add(g.clone().mul_scalar(factor_1)),
                v.mul_scalar(beta_2).add(g.square().mul_scalar(factor_2)),
                time + 1,
            ),
            None => (
                g.clone().mul_scalar(factor_1),
                g.square().mul_scalar(factor_2),
                1,
            ),
        };
        let t = time as i32;
        let m_hat = m.clone().div_scalar(1f32 - beta_1.powi(t));
        let v_hat = v.clone().div_scalar(1f32 - beta_2.powi(t));
        let delta = m_hat.div(v_hat.sqrt().add_scalar(epsilon));
        let decay = lr * weight_decay as f64;
        let decayed = if decay == 0.0 {
            p
        } else {
            p.mul_scalar(1.0 - decay)
        };
        let updated = decayed - delta.mul_scalar(lr);
        self.moments = Some((m, v, time));
        // An element-wise operation after the update's: burn-fusion can fold it into the
        // same kernel.
        self.cast = self.compute.map(|dtype| updated.clone().cast(dtype));
        let module = module.map(&mut Scatter::<A>::new(updated));
        (module, norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, ModelConfig};
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;

    type A = Autodiff<Flex>;

    /// The same initial model in every test, drawn once. burn's generator is one for the
    /// process, and other modules' tests seed it and draw from it in parallel: a model
    /// drawn per call could take another test's seed between `seed` and `init`, and two
    /// "identical" starts would differ.
    fn tiny() -> Seq2Seq<A> {
        static DRAWN: std::sync::OnceLock<Seq2Seq<Flex>> = std::sync::OnceLock::new();
        let start = DRAWN.get_or_init(|| {
            let cfg = ModelConfig {
                vocab_size: 40,
                d_model: 16,
                n_heads: 2,
                enc_layers: 1,
                dec_layers: 1,
                d_ff: 32,
                max_len: 16,
                dropout: 0.0,
                activation: Activation::Relu,
            };
            let device = Default::default();
            cfg.init_seeded::<Flex>(7, &device)
        });
        Seq2Seq::from_inner(start.clone()).map(&mut crate::model::Trainable)
    }

    /// Step `step`'s loss, a plain function of the output (in f32 whatever `net` computes
    /// in).
    fn loss(net: &Seq2Seq<A>, step: i64) -> Tensor<A, 1> {
        let device = Default::default();
        let ids = |v: Vec<i64>| Tensor::<A, 2, Int>::from_data(TensorData::new(v, [2, 4]), &device);
        let no_pad =
            Tensor::<A, 2, Bool>::from_data(TensorData::new(vec![false; 8], [2, 4]), &device);
        let src = ids((0..8).map(|i| 4 + (i * 3 + step) % 30).collect());
        let tgt = ids((0..8).map(|i| 5 + (i * 7 + step) % 30).collect());
        let memory = net.encode(src, no_pad.clone());
        let logits = net.decode(tgt, no_pad.clone(), memory, no_pad);
        logits.cast(FloatDType::F32).powi_scalar(2).mean()
    }

    /// Training steps `steps` of a tiny model.
    fn train<O: Optimizer<Seq2Seq<A>, A>>(
        mut model: Seq2Seq<A>,
        optim: &mut O,
        steps: std::ops::Range<i64>,
    ) -> Seq2Seq<A> {
        for step in steps {
            let grads = GradientsParams::from_grads(loss(&model, step).backward(), &model);
            model = optim.step(1e-2, model, grads);
        }
        model
    }

    /// Training steps `steps` computing in bf16: through the optimiser's copy, or
    /// (`cast_each`) each parameter cast by autodiff, as the CPU trains.
    fn train_bf16(
        mut model: Seq2Seq<A>,
        optim: &mut FlatAdamW<A>,
        steps: std::ops::Range<i64>,
        cast_each: bool,
    ) -> Seq2Seq<A> {
        for step in steps {
            let copier = (!cast_each).then_some(&mut *optim);
            let (net, leaves) = crate::train::step_network(&model, Some(FloatDType::BF16), copier);
            let grads = GradientsParams::from_grads(loss(&net, step).backward(), &leaves);
            model = optim.step(1e-2, model, grads);
        }
        model
    }

    fn values(model: &Seq2Seq<A>) -> Vec<u32> {
        struct All(Vec<u32>);
        impl ModuleVisitor<A> for All {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
                self.0
                    .extend(param.val().into_data().iter::<f32>().map(f32::to_bits));
            }
        }
        let mut all = All(Vec::new());
        model.visit(&mut all);
        all.0
    }

    #[test]
    fn updates_like_burns_adamw_to_the_bit() {
        // Other values than burn's defaults, so that a setting either side ignores shows.
        let settings = AdamWSettings {
            beta_1: 0.8,
            beta_2: 0.99,
            epsilon: 1e-6,
            weight_decay: 0.01,
        };
        let theirs = train(tiny(), &mut settings.burn().init(), 0..3);
        let ours = train(tiny(), &mut FlatAdamW::new(settings), 0..3);
        let (a, b) = (values(&theirs), values(&ours));
        assert_eq!(a.len(), b.len());
        assert_ne!(a, values(&tiny()), "training moved nothing");
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert_eq!(differ, 0, "{differ} of {} parameters differ", a.len());
    }

    #[test]
    fn computing_in_bf16_through_one_cast_updates_like_casting_each_parameter() {
        let settings = AdamWSettings::with_weight_decay(0.01);
        let each = train_bf16(tiny(), &mut FlatAdamW::new(settings), 0..3, true);
        let mut optim = FlatAdamW::new(settings);
        let once = train_bf16(tiny(), &mut optim, 0..3, false);
        let (a, b) = (values(&each), values(&once));
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert_eq!(differ, 0, "{differ} of {} parameters differ", a.len());
        assert_ne!(
            b,
            values(&train(tiny(), &mut FlatAdamW::new(settings), 0..3)),
            "computed in f32 after all"
        );
        // The master parameters stay f32; the copy for the next step is bf16, the update's.
        let copy = optim.cast_copy(&once, FloatDType::BF16);
        assert_eq!(once.embed.weight.val().dtype(), burn::tensor::DType::F32);
        assert_eq!(copy.embed.weight.val().dtype(), burn::tensor::DType::BF16);
        let rounded = once.embed.weight.val().cast(FloatDType::BF16).into_data();
        assert_eq!(copy.embed.weight.val().into_data(), rounded);
    }

    #[test]
    fn a_run_resumed_from_its_checkpointed_record_ends_the_same() {
        use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
        let whole = train(
            tiny(),
            &mut FlatAdamW::new(AdamWSettings::with_weight_decay(0.01)),
            0..3,
        );
        let mut first = FlatAdamW::new(AdamWSettings::with_weight_decay(0.01));
        let halfway = train(tiny(), &mut first, 0..1);
        // Through a file, as `train` checkpoints it.
        let dir = tempfile::tempdir().expect("a temporary directory");
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        let path = dir.path().join("optimizer");
        recorder
            .record(first.to_record(), path.clone())
            .expect("the record saves");
        let record = recorder
            .load(path, &Default::default())
            .expect("the record loads");
        let mut second = FlatAdamW::new(AdamWSettings::with_weight_decay(0.01)).load_record(record);
        let resumed = train(halfway, &mut second, 1..3);
        let (a, b) = (values(&whole), values(&resumed));
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert_eq!(differ, 0, "{differ} of {} parameters differ", a.len());
    }
}
