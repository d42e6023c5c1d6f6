//! The `quantize` stage: a Model in, the same model with smaller weights out. See `weights`
//! for the formats and for what each costs at run time.

use burn::backend::Flex;
use orchestrate_stage::{
    canonical_params, ArtifactKind, InputDecl, Inputs, ParamError, ParamProblem, PathSegment,
    StageContext, StageDescriptor, StageError, StageOutput,
};
use serde::{Deserialize, Serialize};

use orchestrate_model::artifact::{self, CARD, SAFETENSORS, TOKENIZER};
use orchestrate_model::weights::{self, Scheme};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeParams {
    /// `int8`, `dynamic`, `fp16` or `bf16` (`fp32` rewrites the weights unchanged, as a
    /// reference).
    pub scheme: Scheme,
    /// Values per int8 scale.
    #[serde(default = "default_block")]
    pub block: usize,
}

fn default_block() -> usize {
    64
}

pub const DESCRIPTOR: StageDescriptor = StageDescriptor {
    kind: "quantize",
    about: "stores a model's weights as int8 (per block), fp16 or bf16",
    inputs: Inputs::Typed(&[InputDecl {
        name: "model",
        kind: ArtifactKind::Model,
        many: false,
        required: true,
        reads: &[],
    }]),
    output: ArtifactKind::Model,
    device_dependent: false,
    names_in_output: false,
    code_hash: env!("STAGE_CODE_HASH"),
    tracked_files: &["quantization.json"],
    canonical_params: canonical,
    file_deps: orchestrate_stage::no_file_deps,
    empty_part: orchestrate_stage::no_empty_parts,
    unkeyed: &[],
};

fn canonical(v: serde_json::Value) -> Result<serde_json::Value, ParamError> {
    let block_given = v.get("block").is_some();
    let v = canonical_params::<QuantizeParams>(v)?;
    let p: QuantizeParams = serde_json::from_value(v.clone()).expect("just canonicalised");
    // A block written for a scheme without blocks would change nothing but the cache key.
    if block_given && !matches!(p.scheme, Scheme::Int8 | Scheme::Dynamic) {
        return Err(ParamError {
            path: vec![PathSegment::Key("block".into())],
            problem: ParamProblem::Invalid(format!(
                "`block` is for `int8` and `dynamic`; `{}` stores every value as it is",
                p.scheme.as_str()
            )),
        });
    }
    // `int8` keeps its blocks in the file alone, over the flat values: any size it can
    // store a scale per; `dynamic`'s are burn's tensors'.
    let most = if p.scheme == Scheme::Dynamic {
        weights::INT8_BLOCKS[weights::INT8_BLOCKS.len() - 1]
    } else {
        4096
    };
    if !(weights::INT8_BLOCKS[0]..=most).contains(&p.block) || !p.block.is_power_of_two() {
        return Err(ParamError {
            path: vec![PathSegment::Key("block".into())],
            problem: ParamProblem::Invalid(format!(
                "block {} must be a power of two from {} to {most}{}",
                p.block,
                weights::INT8_BLOCKS[0],
                if most == 128 {
                    " for `dynamic` (burn's int8 tensors)"
                } else {
                    ""
                }
            )),
        });
    }
    Ok(v)
}

pub fn run(ctx: &StageContext<'_>) -> Result<StageOutput, StageError> {
    let p: QuantizeParams = ctx.params()?;
    let input = ctx.input("model")?;
    let device = Default::default();
    let source = artifact::load::<Flex>(&input.dir, &device)?;
    if source.card.quantization != Scheme::Fp32 {
        return Err(StageError::Failed(format!(
            "input `model` (stage `{}`) is already quantized ({}): quantize the trained model instead",
            input.stage,
            source.card.quantization.as_str()
        )));
    }
    if p.scheme == Scheme::Dynamic {
        // Refused before anything is written: loading it back would fail the same way.
        weights::check_int8_block(&source.model, p.block)
            .map_err(|e| StageError::Failed(format!("`dynamic`: {e}")))?;
    }
    ctx.checkpoint()?;
    let tensors = weights::export(&source.model);
    let names = weights::names(&source.model);
    if let Some(problem) = unrepresentable(&tensors, &names, p.scheme) {
        return Err(StageError::Failed(format!(
            "input `model` (stage `{}`): {problem}",
            input.stage
        )));
    }
    let out = ctx.out_dir;
    let bytes = weights::save(&out.join(SAFETENSORS), &tensors, p.scheme, p.block)
        .map_err(StageError::Failed)?;
    std::fs::copy(input.dir.join(TOKENIZER), out.join(TOKENIZER))
        .map_err(|e| StageError::io("cannot copy the tokenizer", e))?;
    let mut card = source.card.clone();
    card.quantization = p.scheme;
    write(
        &out.join(CARD),
        &serde_json::to_value(&card).expect("plain JSON"),
    )?;

    // Load it back: proves the artifact works, and measures what a consumer will pay.
    let back = artifact::load::<Flex>(out, &device)?;
    let ratio = bytes as f64 / source.artifact_bytes.max(1) as f64;
    let report = serde_json::json!({
        "scheme": p.scheme,
        "block": p.block,
        "artifact_bytes": bytes,
        "source_artifact_bytes": source.artifact_bytes,
        "size_ratio": ratio,
        "stored_param_bytes": back.stored_param_bytes,
        "resident_param_bytes": back.resident_param_bytes,
    });
    // Load times vary run to run: manifest and metrics only, so the artifact's bytes depend
    // on the model alone (CI retraining compares digests).
    write(&out.join("quantization.json"), &report)?;
    let mut report = report;
    report["load_ms"] = back.load_ms.into();
    report["source_load_ms"] = source.load_ms.into();
    ctx.events.log(&format!(
        "{}: {} bytes ({:.1}% of fp32's {}), parameters {} bytes stored, {} in memory, loads in {:.0} ms",
        p.scheme.as_str(),
        bytes,
        100.0 * ratio,
        source.artifact_bytes,
        back.stored_param_bytes,
        back.resident_param_bytes,
        back.load_ms
    ));
    ctx.events.metric("artifact_bytes", bytes as f64, None);
    ctx.events.metric("size_ratio", ratio, None);
    ctx.events.metric("load_ms", back.load_ms, None);
    let mut output = StageOutput::default();
    if let serde_json::Value::Object(m) = report {
        output.metadata = m;
    }
    Ok(output)
}

/// fp16's largest finite value.
const F16_MAX: f32 = 65504.0;
/// The smallest f32 magnitude that rounds to an fp16 infinity: halfway between 65504 and
/// the next step (65536) would round to even, which is infinity.
const F16_OVERFLOW: f32 = 65520.0;

/// bf16's largest finite value, (2 - 2⁻⁷)·2¹²⁷.
const BF16_MAX: f32 = f32::from_bits(0x7F7F_0000);
/// Halfway from it to the next step (2¹²⁸), which rounds to even, an infinity.
const BF16_OVERFLOW: f32 = f32::from_bits(0x7F7F_8000);

/// Why `scheme` cannot hold these weights faithfully, if it cannot. A value that is not
/// finite (a diverged training) would otherwise pass silently: int8 turns NaN into code 0,
/// a finite-looking model, and an infinite value makes its block's scale infinite, the
/// whole block NaN once loaded. fp16 turns a value beyond ±65504 into an infinity.
/// `names` are the tensors' (see [`weights::names`]).
fn unrepresentable(
    tensors: &[weights::HostTensor],
    names: &[String],
    scheme: Scheme,
) -> Option<String> {
    for (i, t) in tensors.iter().enumerate() {
        let at = |j: usize, v: f32| {
            let which = match names.get(i) {
                Some(name) => format!("`{name}`"),
                None => format!("parameter tensor {i} of {}", tensors.len()),
            };
            format!("{which} (shape {:?}) holds {v} at index {j}", t.shape)
        };
        if let Some((j, v)) = t.values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Some(format!(
                "{}: the model is not finite (a training that diverged?); retrain it",
                at(j, *v)
            ));
        }
        // Rounded to nearest: fp16 makes values up to 65520 65504, beyond it infinity; bf16
        // overflows only within 0.2% of f32's own limit (a diverging training's weights).
        let limit = match scheme {
            Scheme::Fp16 => Some((F16_OVERFLOW, "fp16", F16_MAX, "use `bf16` or `int8`")),
            Scheme::Bf16 => Some((BF16_OVERFLOW, "bf16", BF16_MAX, "retrain it")),
            _ => None,
        };
        if let Some((overflow, name, max, hint)) = limit {
            let overflows = |v: &f32| v.abs() >= overflow;
            if let Some((j, v)) = t.values.iter().enumerate().find(|(_, v)| overflows(v)) {
                return Some(format!(
                    "{}, beyond {name}'s range (±{max:e}); {hint}",
                    at(j, *v)
                ));
            }
        }
    }
    None
}

fn write(path: &std::path::Path, v: &serde_json::Value) -> Result<(), StageError> {
    std::fs::write(path, serde_json::to_vec_pretty(v).expect("plain JSON"))
        .map_err(|e| StageError::io(format!("cannot write {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(values: Vec<f32>) -> weights::HostTensor {
        weights::HostTensor {
            shape: vec![values.len()],
            values,
        }
    }

    #[test]
    fn a_block_is_for_the_schemes_with_blocks() {
        let with = |scheme: &str| canonical(serde_json::json!({"scheme": scheme, "block": 32}));
        assert!(with("int8").is_ok() && with("dynamic").is_ok());
        let e = with("fp16").unwrap_err().to_string();
        assert!(e.contains("`block` is for `int8` and `dynamic`"), "{e}");
        assert!(canonical(serde_json::json!({"scheme": "fp16"})).is_ok());
    }

    #[test]
    fn weights_a_scheme_cannot_hold_are_refused() {
        let fine = [tensor(vec![0.5, -1.0]), tensor(vec![65504.0, -65519.0])];
        for scheme in [Scheme::Int8, Scheme::Fp16, Scheme::Bf16, Scheme::Dynamic] {
            assert_eq!(unrepresentable(&fine, &[], scheme), None, "{scheme:?}");
        }
        let big = [tensor(vec![0.5]), tensor(vec![1.0, 1e5])];
        let e = unrepresentable(&big, &[], Scheme::Fp16).unwrap();
        assert!(e.contains("tensor 1 of 2") && e.contains("index 1"), "{e}");
        assert!(e.contains("beyond fp16's range"), "{e}");
        // Named as the model names it, where the names are known.
        let names = ["embed.weight".to_string(), "decoder.norm.bias".to_string()];
        let e = unrepresentable(&big, &names, Scheme::Fp16).unwrap();
        assert!(e.contains("`decoder.norm.bias` (shape [2])"), "{e}");
        assert_eq!(unrepresentable(&big, &[], Scheme::Bf16), None);
        // bf16 holds its largest value, and refuses what would round past it.
        let edge = [tensor(vec![BF16_MAX, -BF16_MAX])];
        assert_eq!(unrepresentable(&edge, &[], Scheme::Bf16), None);
        let e = unrepresentable(&[tensor(vec![f32::MAX])], &[], Scheme::Bf16).unwrap();
        assert!(e.contains("beyond bf16's range"), "{e}");
        assert_eq!(half::bf16::from_f32(BF16_MAX).to_f32(), BF16_MAX);
        assert!(half::bf16::from_f32(BF16_OVERFLOW).is_infinite());
        assert!(!half::bf16::from_f32(f32::from_bits(BF16_OVERFLOW.to_bits() - 1)).is_infinite());
        for bad in [f32::NAN, f32::INFINITY] {
            let e = unrepresentable(&[tensor(vec![1.0, bad])], &[], Scheme::Int8).unwrap();
            assert!(e.contains("not finite"), "{e}");
        }
    }
}
