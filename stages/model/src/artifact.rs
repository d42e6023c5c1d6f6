//! A Model artifact on disk, and loading it into a network that runs. Every stage that
//! reads a model (quantize, evaluate, deploy) and `orchestrate serve` come through here.
//!
//! Layout: `model.json` (config, special tokens, tokenizer digest, quantization), the
//! tokenizer as `tokenizer.json`, and the weights as `model.mpk` (burn's record, as `train`
//! writes it) or `weights.safetensors` (as `quantize` writes it, see `weights`).

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use orchestrate_stage::StageError;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::data::Specials;
use crate::model::{ModelConfig, Seq2Seq};
use crate::weights::{self, Scheme};

pub const CARD: &str = "model.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const BURN_WEIGHTS: &str = "model.mpk";
pub const SAFETENSORS: &str = "weights.safetensors";

/// `model.json`: what a Model artifact is, without its weights.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelCard {
    pub preset: serde_json::Value,
    pub config: ModelConfig,
    pub parameters: usize,
    pub specials: Specials,
    pub tokenizer_digest: String,
    /// `fp32` for a trained model; the scheme for a quantized one.
    #[serde(default = "fp32")]
    pub quantization: Scheme,
}

fn fp32() -> Scheme {
    Scheme::Fp32
}

/// A model ready to generate, with what to report about it.
pub struct LoadedModel<B: Backend> {
    pub model: Seq2Seq<B>,
    pub card: ModelCard,
    pub tokenizer: Tokenizer,
    /// Size of the weights file.
    pub artifact_bytes: u64,
    /// Bytes of the parameters as stored (int8 codes and scales, halves, floats).
    pub stored_param_bytes: u64,
    /// Bytes the parameters take in memory once loaded: f32, except the `dynamic` scheme's
    /// int8 weight matrices (see `weights`).
    pub resident_param_bytes: u64,
    pub load_ms: f64,
}

fn fail(dir: &Path, what: impl std::fmt::Display) -> StageError {
    StageError::Failed(format!("model at {}: {what}", dir.display()))
}

pub fn read_card(dir: &Path) -> Result<ModelCard, StageError> {
    let bytes =
        std::fs::read(dir.join(CARD)).map_err(|e| fail(dir, format!("cannot read {CARD}: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| fail(dir, format!("{CARD}: {e}")))
}

pub fn load<B: Backend>(dir: &Path, device: &B::Device) -> Result<LoadedModel<B>, StageError> {
    let started = Instant::now();
    let card = read_card(dir)?;
    let tokenizer = Tokenizer::from_file(dir.join(TOKENIZER))
        .map_err(|e| fail(dir, format!("cannot load {TOKENIZER}: {e}")))?;
    if tokenizer.get_vocab_size(true) != card.config.vocab_size {
        return Err(fail(
            dir,
            format!(
                "the tokenizer has {} tokens but the model {}",
                tokenizer.get_vocab_size(true),
                card.config.vocab_size
            ),
        ));
    }
    let fresh: Seq2Seq<B> = card.config.init(device);
    let (model, artifact_bytes, stored, int8_block) = if dir.join(SAFETENSORS).exists() {
        let path = dir.join(SAFETENSORS);
        let loaded = weights::load(&path).map_err(|e| fail(dir, e))?;
        let model = weights::import(fresh, &loaded.tensors).map_err(|e| fail(dir, e))?;
        let (model, kept) = match loaded.scheme {
            Scheme::Dynamic => (
                weights::keep_int8(model, loaded.block).map_err(|e| fail(dir, e))?,
                Some(loaded.block),
            ),
            _ => (model, None),
        };
        (model, file_len(&path), loaded.stored_bytes, kept)
    } else {
        let path = dir.join(BURN_WEIGHTS);
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        let model = fresh
            .load_file(dir.join("model"), &recorder, device)
            .map_err(|e| fail(dir, format!("cannot load {BURN_WEIGHTS}: {e}")))?;
        (model, file_len(&path), 4 * card.parameters as u64, None)
    };
    let resident = weights::resident_bytes(&model, int8_block);
    Ok(LoadedModel {
        model,
        card,
        tokenizer,
        artifact_bytes,
        stored_param_bytes: stored,
        resident_param_bytes: resident,
        load_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Encoder input for a prompt: language and author tokens, then the prompt's tokens.
/// Returns the ids and whether the author was known (unknown ones become `other`).
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    specials: &Specials,
    prompt: &str,
    lang: &str,
    author: Option<&str>,
) -> Result<(Vec<u32>, bool), String> {
    let enc = tokenizer.encode(prompt, false).map_err(|e| e.to_string())?;
    let known = author.is_none_or(|a| specials.authors.contains_key(a));
    let mut ids = vec![specials.lang(lang), specials.author(author)];
    ids.extend_from_slice(enc.get_ids());
    Ok((ids, known))
}
