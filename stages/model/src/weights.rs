//! Weights as files: every float parameter of the network in module order, written to a
//! safetensors file (readable by any safetensors tool) in one of four precisions.
//!
//! `int8` stores each weight matrix as signed bytes in blocks of `block` consecutive values,
//! each block with its own f32 scale (symmetric: `x ≈ q * scale`, `q` in -127..=127), so
//! an outlier spoils only its block. Vectors (biases, norms) stay f32: they are a few
//! kilobytes and quantizing them costs accuracy for nothing.
//!
//! At load every variant becomes f32 again: burn 0.21 has no int8 or half-precision matrix
//! product on the CPU that beats its f32 one, so the saving is on disk and in transfer, not
//! in arithmetic. The README says so too.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use half::{bf16, f16};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::model::Seq2Seq;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    Fp32,
    Fp16,
    Bf16,
    Int8,
    /// Stored as `Int8`; at load the weight matrices stay int8 in memory as burn quantized
    /// tensors, dequantized block by block inside each product (activations stay f32).
    Dynamic,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Fp32 => "fp32",
            Scheme::Fp16 => "fp16",
            Scheme::Bf16 => "bf16",
            Scheme::Int8 => "int8",
            Scheme::Dynamic => "dynamic",
        }
    }
}

/// One parameter tensor, host side.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

struct Collect(Vec<HostTensor>);

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let shape = t.dims().to_vec();
        let values = t
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("float parameters");
        self.0.push(HostTensor { shape, values });
    }
}

/// Where a visitor or mapper is in the module tree: `decoder.layers.0.ff.linear1.weight`.
#[derive(Default)]
struct ModulePath(Vec<String>);

impl ModulePath {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn name(&self) -> String {
        self.0.join(".")
    }
}

struct Replace<'a> {
    tensors: std::slice::Iter<'a, HostTensor>,
    path: ModulePath,
    error: Option<String>,
}

impl<B: Backend> ModuleMapper<B> for Replace<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let want = tensor.dims().to_vec();
        let next = self.tensors.next();
        match next {
            Some(h) if h.shape == want => {
                let device = tensor.device();
                let t =
                    Tensor::from_data(TensorData::new(h.values.clone(), h.shape.clone()), &device);
                Param::from_mapped_value(id, t, mapper)
            }
            other => {
                self.error.get_or_insert_with(|| match other {
                    Some(h) => format!(
                        "`{}` has shape {:?} in the weights where the model's config makes it {want:?}",
                        self.path.name(),
                        h.shape
                    ),
                    None => "the weights file has fewer tensors than the model".into(),
                });
                Param::from_mapped_value(id, tensor, mapper)
            }
        }
    }
}

/// Every float parameter's name and shape, in module order.
#[derive(Default)]
struct Shapes {
    path: ModulePath,
    found: Vec<(String, Vec<usize>)>,
}

impl<B: Backend> ModuleVisitor<B> for Shapes {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.found.push((self.path.name(), param.shape().to_vec()));
    }
}

fn shapes<B: Backend>(model: &Seq2Seq<B>) -> Vec<(String, Vec<usize>)> {
    let mut s = Shapes::default();
    model.visit(&mut s);
    s.found
}

/// Whether `loaded` has the shapes of `configured` (a model built from the config that
/// claims to describe it). burn's record loading takes a stored tensor of any shape, so
/// without this a `model.json` whose sizes differ from its weights loads, and reports
/// sizes the network does not have.
pub fn check_shapes<B: Backend>(
    configured: &Seq2Seq<B>,
    loaded: &Seq2Seq<B>,
) -> Result<(), String> {
    for ((name, want), (_, got)) in shapes(configured).iter().zip(shapes(loaded).iter()) {
        if want != got {
            return Err(format!(
                "`{name}` has shape {got:?} in the weights where the model's config makes it {want:?}"
            ));
        }
    }
    Ok(())
}

/// The blocks `dynamic` takes: powers of two from 8 (smaller ones cost more in scales than
/// they gain in precision) to 128, the most burn's int8 tensors take.
pub const INT8_BLOCKS: [usize; 5] = [8, 16, 32, 64, 128];

/// Whether `dynamic`'s int8 blocks of `block` values fit every weight matrix: burn's
/// quantized tensors take blocks along a matrix's rows, so `block` must divide its width
/// (a block wider than a row, or one that straddles two, panics inside burn).
pub fn check_int8_block<B: Backend>(model: &Seq2Seq<B>, block: usize) -> Result<(), String> {
    let most = INT8_BLOCKS[INT8_BLOCKS.len() - 1];
    if block == 0 || block > most {
        return Err(format!(
            "block {block} must be from 1 to {most}, the most burn's int8 tensors take"
        ));
    }
    let rows: Vec<(String, usize)> = shapes(model)
        .into_iter()
        .filter(|(_, shape)| shape.len() >= 2)
        .map(|(name, shape)| {
            let width = shape.last().copied().unwrap_or(0);
            (format!("`{name}` ({shape:?})"), width)
        })
        .collect();
    match int8_block_misfit(block, &rows) {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}

/// Why `dynamic`'s int8 blocks of `block` values do not fit weight matrices with rows of
/// these widths (each named), if they do not: with the block that would fit them all, or,
/// where no power of two from 8 to 128 does (`d_model: 100`), the scheme to use instead.
/// `validate` asks the same of a train stage's `d_model` and `d_ff` before anything runs.
pub fn int8_block_misfit(block: usize, rows: &[(String, usize)]) -> Option<String> {
    let (name, width) = rows.iter().find(|(_, w)| w % block != 0)?;
    let fits = INT8_BLOCKS
        .into_iter()
        .rev()
        .find(|b| rows.iter().all(|(_, w)| w % b == 0));
    let instead = match fits {
        Some(b) => format!("block {b} divides them all"),
        None => {
            format!("no block of {INT8_BLOCKS:?} divides them all: use `int8`, whose blocks may")
        }
    };
    Some(format!(
        "int8 blocks of {block} values must divide every weight matrix's rows, but {name} has \
         rows of {width}; {instead}"
    ))
}

/// Keeps every weight matrix as a burn quantized tensor (symmetric int8 in blocks of
/// `block`); vectors stay f32, as in the file.
struct QuantizeMatrices(burn::tensor::quantization::QuantScheme);

impl<B: Backend> ModuleMapper<B> for QuantizeMatrices {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        use burn::tensor::quantization::{compute_q_params, compute_range, Calibration};
        if D < 2 {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        let range = compute_range(&self.0, &tensor, &Calibration::MinMax);
        let q = tensor.quantize(&self.0, compute_q_params(&self.0, range));
        Param::from_mapped_value(id, q, mapper)
    }
}

/// The model with its weight matrices held as int8 blocks in memory (the `dynamic` scheme).
pub fn keep_int8<B: Backend>(model: Seq2Seq<B>, block: usize) -> Result<Seq2Seq<B>, String> {
    use burn::tensor::quantization::{BlockSize, QuantLevel, QuantParam, QuantScheme, QuantValue};
    check_int8_block(&model, block)?;
    let block = u8::try_from(block).expect("checked: at most 128");
    let scheme = QuantScheme::default()
        .with_value(QuantValue::Q8S)
        .with_level(QuantLevel::Block(BlockSize::new([block])))
        .with_param(QuantParam::F32);
    Ok(model.map(&mut QuantizeMatrices(scheme)))
}

struct Sizes {
    block: Option<usize>,
    bytes: u64,
}

impl<B: Backend> ModuleVisitor<B> for Sizes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let n: usize = param.shape().num_elements();
        self.bytes += match self.block {
            Some(b) if D >= 2 => (n + 4 * n.div_ceil(b)) as u64,
            _ => 4 * n as u64,
        };
    }
}

/// Bytes the parameters take in memory: f32, or int8 blocks plus scales for the matrices
/// when `int8_block` is given.
pub fn resident_bytes<B: Backend>(model: &Seq2Seq<B>, int8_block: Option<usize>) -> u64 {
    let mut s = Sizes {
        block: int8_block,
        bytes: 0,
    };
    model.visit(&mut s);
    s.bytes
}

/// Every float parameter's name (`decoder.layers.0.ff.linear1.weight`), in module order,
/// as [`export`] lists them.
pub fn names<B: Backend>(model: &Seq2Seq<B>) -> Vec<String> {
    shapes(model).into_iter().map(|(name, _)| name).collect()
}

/// Every float parameter, in module order.
pub fn export<B: Backend>(model: &Seq2Seq<B>) -> Vec<HostTensor> {
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// The model with its parameters replaced by `tensors` (module order).
pub fn import<B: Backend>(model: Seq2Seq<B>, tensors: &[HostTensor]) -> Result<Seq2Seq<B>, String> {
    let mut r = Replace {
        tensors: tensors.iter(),
        path: ModulePath::default(),
        error: None,
    };
    let model = model.map(&mut r);
    if let Some(e) = r.error {
        return Err(e);
    }
    if r.tensors.next().is_some() {
        return Err("the weights file has more tensors than the model".into());
    }
    Ok(model)
}

/// Symmetric int8 in blocks: the codes and one scale per block.
pub fn quantize_blocks(values: &[f32], block: usize) -> (Vec<i8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len().div_ceil(block));
    for chunk in values.chunks(block) {
        let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        scales.push(scale);
        codes.extend(
            chunk
                .iter()
                .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8),
        );
    }
    (codes, scales)
}

pub fn dequantize_blocks(codes: &[i8], scales: &[f32], block: usize) -> Vec<f32> {
    codes
        .chunks(block)
        .zip(scales)
        .flat_map(|(c, s)| c.iter().map(move |q| *q as f32 * s))
        .collect()
}

const META_KEY: &str = "orchestrate";

fn name(i: usize) -> String {
    format!("p{i:04}")
}

/// Writes `tensors` to `path` in `scheme`; returns the file's size in bytes.
pub fn save(
    path: &Path,
    tensors: &[HostTensor],
    scheme: Scheme,
    block: usize,
) -> Result<u64, String> {
    // Owned byte buffers first; the views borrow them.
    let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let matrix = t.shape.len() >= 2;
        match scheme {
            Scheme::Int8 | Scheme::Dynamic if matrix => {
                let (codes, scales) = quantize_blocks(&t.values, block);
                let bytes = codes.iter().map(|c| *c as u8).collect();
                blobs.push((name(i), Dtype::I8, t.shape.clone(), bytes));
                let n = scales.len();
                let bytes = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                blobs.push((format!("{}.scale", name(i)), Dtype::F32, vec![n], bytes));
            }
            Scheme::Fp16 => {
                let bytes = t
                    .values
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect();
                blobs.push((name(i), Dtype::F16, t.shape.clone(), bytes));
            }
            Scheme::Bf16 => {
                let bytes = t
                    .values
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect();
                blobs.push((name(i), Dtype::BF16, t.shape.clone(), bytes));
            }
            Scheme::Fp32 | Scheme::Int8 | Scheme::Dynamic => {
                let bytes = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                blobs.push((name(i), Dtype::F32, t.shape.clone(), bytes));
            }
        }
    }
    let views = blobs
        .iter()
        .map(|(n, d, s, b)| {
            Ok((
                n.clone(),
                TensorView::new(*d, s.clone(), b).map_err(|e| e.to_string())?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    // One metadata entry: safetensors keeps metadata in a HashMap, whose order (and so the
    // file's bytes) would change from run to run with several.
    let header = serde_json::json!({
        "format": "orchestrate-weights",
        "scheme": scheme.as_str(),
        "block": block,
        "tensors": tensors.len(),
    });
    let meta = HashMap::from([(META_KEY.to_string(), header.to_string())]);
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())?;
    std::fs::write(path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(bytes.len() as u64)
}

/// What `load` found in a weights file.
pub struct Loaded {
    pub tensors: Vec<HostTensor>,
    pub scheme: Scheme,
    /// Values per int8 scale.
    pub block: usize,
    /// Bytes the parameters take as stored (codes, scales, halves).
    pub stored_bytes: u64,
}

pub fn load(path: &Path) -> Result<Loaded, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (_, meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let not_ours = || {
        format!(
            "{}: not an orchestrate weights file (no `{META_KEY}` header)",
            path.display()
        )
    };
    let header: serde_json::Value = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .and_then(|h| serde_json::from_str(h).ok())
        .ok_or_else(not_ours)?;
    let scheme: Scheme = serde_json::from_value(header["scheme"].clone())
        .map_err(|e| format!("{}: scheme: {e}", path.display()))?;
    let block = header["block"]
        .as_u64()
        .filter(|b| *b > 0)
        .ok_or_else(not_ours)? as usize;
    let count = header["tensors"].as_u64().ok_or_else(not_ours)? as usize;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    // The header's count is checked against the file before anything is sized by it: a
    // corrupt count would otherwise ask for an allocation that aborts the process.
    let held = st.names().iter().filter(|n| !n.ends_with(".scale")).count();
    if held != count {
        return Err(format!(
            "{}: the header lists {count} tensors, but the file holds {held}",
            path.display()
        ));
    }
    let mut tensors = Vec::with_capacity(count);
    let mut stored = 0u64;
    for i in 0..count {
        let view = st
            .tensor(&name(i))
            .map_err(|e| format!("{}: tensor {i}: {e}", path.display()))?;
        let shape = view.shape().to_vec();
        let data = view.data();
        stored += data.len() as u64;
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::I8 => {
                let scales = st
                    .tensor(&format!("{}.scale", name(i)))
                    .map_err(|e| format!("{}: scales of tensor {i}: {e}", path.display()))?;
                // Read as f32 below: a file whose scales are another type (converted by
                // another tool) is named, not decoded into garbage.
                if scales.dtype() != Dtype::F32 {
                    return Err(format!(
                        "{}: the scales of tensor {i} ({}.scale) are {:?}, not F32",
                        path.display(),
                        name(i),
                        scales.dtype()
                    ));
                }
                stored += scales.data().len() as u64;
                let scales: Vec<f32> = scales
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let codes: Vec<i8> = data.iter().map(|b| *b as i8).collect();
                if scales.len() != codes.len().div_ceil(block) {
                    return Err(format!(
                        "{}: tensor {i} has {} scales for {} values",
                        path.display(),
                        scales.len(),
                        codes.len()
                    ));
                }
                dequantize_blocks(&codes, &scales, block)
            }
            other => {
                return Err(format!(
                    "{}: tensor {i} has unsupported type {other:?}",
                    path.display()
                ))
            }
        };
        // `quantize` writes none (it refuses a non-finite weight): one here is damage, or
        // another tool's rewrite, and would make every output of the model NaN.
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "{}: tensor {i} ({}) holds {} at index {at}, not a finite weight",
                path.display(),
                name(i),
                values[at]
            ));
        }
        tensors.push(HostTensor { shape, values });
    }
    Ok(Loaded {
        tensors,
        scheme,
        block,
        stored_bytes: stored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(d_ff: usize) -> Seq2Seq<burn::backend::Flex> {
        crate::model::ModelConfig {
            vocab_size: 40,
            d_model: 32,
            n_heads: 4,
            enc_layers: 1,
            dec_layers: 1,
            d_ff,
            max_len: 16,
            dropout: 0.0,
            activation: crate::model::Activation::Relu,
        }
        .init(&Default::default())
    }

    #[test]
    fn a_dynamic_block_that_does_not_divide_a_row_is_an_error_not_a_panic() {
        // Rows of 32 (d_model) and 64 (d_ff): 64 is wider than some, 48 straddles rows.
        for block in [64, 48] {
            let Err(e) = keep_int8(tiny(64), block) else {
                panic!("block {block} was taken")
            };
            assert!(
                e.contains(&format!("blocks of {block} values"))
                    && e.contains("rows of 32")
                    && e.contains("`embed.weight` ([40, 32])"),
                "{e}"
            );
        }
        assert!(check_int8_block(&tiny(64), 256)
            .unwrap_err()
            .contains("128"));
        // The message names a block that fits, or says that none does.
        let rows = |w: &[usize]| -> Vec<(String, usize)> {
            w.iter().map(|&w| (format!("w{w}"), w)).collect()
        };
        assert_eq!(int8_block_misfit(64, &rows(&[256, 1024])), None);
        let e = int8_block_misfit(64, &rows(&[96, 384])).unwrap();
        assert!(
            e.contains("w96 has rows of 96; block 32 divides them all"),
            "{e}"
        );
        let e = int8_block_misfit(8, &rows(&[100, 400])).unwrap();
        assert!(e.contains("use `int8`"), "{e}");
        assert!(keep_int8(tiny(64), 32).is_ok());
        // `int8` keeps its blocks in the file only, over the flat values: any block works.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let tensors = export(&tiny(64));
        save(&path, &tensors, Scheme::Int8, 4096).unwrap();
        assert_eq!(load(&path).unwrap().tensors.len(), tensors.len());
    }

    #[test]
    fn weights_of_other_sizes_than_the_config_are_named() {
        let e = check_shapes(&tiny(128), &tiny(64)).unwrap_err();
        assert!(
            e.contains("`encoder.layers.0.")
                && e.contains("[32, 64] in the weights")
                && e.contains("makes it [32, 128]"),
            "{e}"
        );
        assert!(check_shapes(&tiny(64), &tiny(64)).is_ok());
        let Err(e) = import(tiny(128), &export(&tiny(64))) else {
            panic!("imported")
        };
        assert!(
            e.contains("`encoder.layers.0.") && e.contains("[32, 128]"),
            "{e}"
        );
    }

    #[test]
    fn int8_blocks_round_trip_within_half_a_step() {
        let v: Vec<f32> = (0..200)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let (codes, scales) = quantize_blocks(&v, 64);
        assert_eq!(scales.len(), 4);
        let back = dequantize_blocks(&codes, &scales, 64);
        for (i, (a, b)) in v.iter().zip(&back).enumerate() {
            assert!(
                (a - b).abs() <= scales[i / 64] / 2.0 + 1e-6,
                "{i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn a_header_counting_other_tensors_than_the_file_holds_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<u8> = [0.5f32; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
        for count in [1_000_000_000_000_000u64, 2, 0] {
            let path = dir.path().join(format!("{count}.safetensors"));
            let header = serde_json::json!({
                "format": "orchestrate-weights",
                "scheme": "fp32",
                "block": 32,
                "tensors": count,
            });
            let view = TensorView::new(Dtype::F32, vec![4], &values).unwrap();
            let meta = HashMap::from([(META_KEY.to_string(), header.to_string())]);
            let bytes = safetensors::serialize([(name(0), view)], Some(meta)).unwrap();
            std::fs::write(&path, bytes).unwrap();
            let e = load(&path).err().expect("a wrong count loads");
            assert!(
                e.contains(&format!("lists {count} tensors, but the file holds 1")),
                "{e}"
            );
        }
    }

    /// A file another tool rewrote, or damaged, with a weight or an int8 scale not finite.
    #[test]
    fn a_weight_that_is_not_finite_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let write = |file: &str, scheme: &str, tensors: Vec<(String, TensorView<'_>)>| {
            let header = serde_json::json!({
                "format": "orchestrate-weights",
                "scheme": scheme,
                "block": 2,
                "tensors": 1,
            });
            let meta = HashMap::from([(META_KEY.to_string(), header.to_string())]);
            let path = dir.path().join(file);
            std::fs::write(&path, safetensors::serialize(tensors, Some(meta)).unwrap()).unwrap();
            path
        };
        let values: Vec<u8> = [0.5f32, f32::NAN, 1.0, 2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = TensorView::new(Dtype::F32, vec![4], &values).unwrap();
        let e = load(&write("nan.safetensors", "fp32", vec![(name(0), view)]))
            .err()
            .expect("a NaN weight loads");
        assert!(
            e.contains("tensor 0") && e.contains("NaN at index 1"),
            "{e}"
        );
        let codes = [1u8, 2, 3, 4];
        let scales: Vec<u8> = [0.1f32, f32::INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let tensors = vec![
            (
                name(0),
                TensorView::new(Dtype::I8, vec![4], &codes).unwrap(),
            ),
            (
                format!("{}.scale", name(0)),
                TensorView::new(Dtype::F32, vec![2], &scales).unwrap(),
            ),
        ];
        let e = load(&write("inf.safetensors", "int8", tensors))
            .err()
            .expect("an infinite scale loads");
        assert!(e.contains("inf at index 2"), "{e}");
    }

    #[test]
    fn every_scheme_saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = vec![
            HostTensor {
                shape: vec![64, 64],
                values: (0..4096).map(|i| (i % 128) as f32 / 100.0 - 0.6).collect(),
            },
            HostTensor {
                shape: vec![32],
                values: vec![1.0; 32],
            },
        ];
        let mut sizes = HashMap::new();
        for scheme in [
            Scheme::Fp32,
            Scheme::Fp16,
            Scheme::Bf16,
            Scheme::Int8,
            Scheme::Dynamic,
        ] {
            let path = dir.path().join(format!("{}.safetensors", scheme.as_str()));
            sizes.insert(scheme.as_str(), save(&path, &tensors, scheme, 32).unwrap());
            let back = load(&path).unwrap();
            assert_eq!(back.scheme, scheme);
            assert_eq!(back.tensors.len(), 2);
            assert_eq!(
                back.tensors[1], tensors[1],
                "vectors survive every scheme exactly"
            );
            for (a, b) in tensors[0].values.iter().zip(&back.tensors[0].values) {
                assert!((a - b).abs() < 0.01, "{scheme:?}: {a} vs {b}");
            }
        }
        assert!(sizes["int8"] < sizes["fp16"] && sizes["fp16"] < sizes["fp32"]);
    }
}
