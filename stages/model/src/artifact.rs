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
    let card: ModelCard =
        serde_json::from_slice(&bytes).map_err(|e| fail(dir, format!("{CARD}: {e}")))?;
    // A damaged or hand-edited card would otherwise panic in burn as the model is built.
    if let Some(problem) = card.config.problem() {
        return Err(fail(dir, format!("{CARD}: {problem}")));
    }
    Ok(card)
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
    check_specials(&tokenizer, &card.specials).map_err(|e| fail(dir, e))?;
    // Zeros, not random weights: every one is replaced, and zeros neither wait for nor
    // move the generator a training beside this seeds (see `ModelConfig::init_seeded`).
    let fresh: Seq2Seq<B> = card.config.init_zeroed(device);
    let (model, artifact_bytes, stored, int8_block) = if dir.join(SAFETENSORS).exists() {
        let path = dir.join(SAFETENSORS);
        let loaded = weights::load(&path).map_err(|e| fail(dir, e))?;
        // What is reported (and which way it runs) must be one scheme.
        if loaded.scheme != card.quantization {
            return Err(fail(
                dir,
                format!(
                    "{SAFETENSORS} holds {} weights but {CARD} says {}",
                    loaded.scheme.as_str(),
                    card.quantization.as_str()
                ),
            ));
        }
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
        // burn's record holds f32 weights only: a card claiming another scheme would report
        // and gate this model as what it is not.
        if card.quantization != Scheme::Fp32 {
            return Err(fail(
                dir,
                format!(
                    "{CARD} says {} but the artifact holds no {SAFETENSORS}, only fp32 {BURN_WEIGHTS}",
                    card.quantization.as_str()
                ),
            ));
        }
        let path = dir.join(BURN_WEIGHTS);
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        // The record's tensors replace the config's whatever their shapes: compared after.
        let configured = fresh.clone();
        let model = fresh
            .load_file(dir.join("model"), &recorder, device)
            .map_err(|e| fail(dir, format!("cannot load {BURN_WEIGHTS}: {e}")))?;
        weights::check_shapes(&configured, &model)
            .map_err(|e| fail(dir, format!("{BURN_WEIGHTS} does not match {CARD}: {e}")))?;
        // Counted from the weights loaded, not from the card's claim.
        let stored = weights::resident_bytes(&model, None);
        (model, file_len(&path), stored, None)
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

/// Whether `tokenizer.json` has the control tokens `model.json` was trained with, at the
/// same ids: a tokenizer from another `bpe` run puts its authors (and so every id after
/// them) elsewhere. `model.json`'s `tokenizer_digest` cannot be checked here: it is the
/// digest of the whole `bpe` artifact (`tokenizer_meta.json` too), not of `tokenizer.json`.
fn check_specials(tokenizer: &Tokenizer, specials: &Specials) -> Result<(), String> {
    use orchestrate_corpus::bpe::{author_token, lang_token, BOS, EOS, OTHER_AUTHOR, PAD};
    let mut expected = vec![
        (PAD.to_string(), specials.pad),
        (BOS.to_string(), specials.bos),
        (EOS.to_string(), specials.eos),
        (OTHER_AUTHOR.to_string(), specials.other_author),
    ];
    expected.extend(specials.langs.iter().map(|(l, id)| (lang_token(l), *id)));
    expected.extend(
        specials
            .authors
            .iter()
            .map(|(a, id)| (author_token(a), *id)),
    );
    for (token, id) in expected {
        let found = tokenizer.id_to_token(id);
        if found.as_deref() != Some(token.as_str()) {
            return Err(format!(
                "{TOKENIZER} is not the tokenizer {CARD} was trained with: {CARD} has `{token}` \
                 at id {id}, {TOKENIZER} {}",
                match found {
                    Some(t) => format!("has `{t}` there"),
                    None => "has no such id".into(),
                }
            ));
        }
    }
    // Authors the tokenizer has and the model never learned.
    let prefix = author_token("");
    let prefix = &prefix[..prefix.len() - 1];
    let extra: Vec<String> = tokenizer
        .get_added_tokens_decoder()
        .values()
        .map(|t| t.content.clone())
        .filter(|t| t.starts_with(prefix) && t != OTHER_AUTHOR)
        .filter(|t| !specials.authors.keys().any(|a| author_token(a) == *t))
        .collect();
    if !extra.is_empty() {
        return Err(format!(
            "{TOKENIZER} is not the tokenizer {CARD} was trained with: it has author tokens \
             {CARD} lacks ({})",
            extra.join(", ")
        ));
    }
    Ok(())
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// `tokenizer` set to encode text that names a special token (`<eos>`, `<author:X>`) as
/// that text, never as the token: for user text. Decoding is unchanged.
pub fn text_only(tokenizer: &Tokenizer) -> Tokenizer {
    let mut t = tokenizer.clone();
    t.set_encode_special_tokens(true);
    t
}

/// A prompt's text as the model reads it: in NFC, as the corpus the tokenizer learnt from
/// (a prompt typed decomposed, `e` and a combining accent as macOS does, would otherwise be
/// split into pieces training never saw).
pub fn prompt_text(prompt: &str) -> std::borrow::Cow<'_, str> {
    orchestrate_corpus::nfc(prompt)
}

/// Encoder input for a prompt: language and author tokens, then the prompt's tokens.
/// Returns the ids and whether the author was known (unknown ones become `other`).
/// The prompt's text never becomes control tokens: a prompt saying `<eos>` or
/// `<author:X>` is split as the text it is (a caller that encodes many prompts passes a
/// tokenizer from [`text_only`], which saves a copy per call).
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    specials: &Specials,
    prompt: &str,
    lang: &str,
    author: Option<&str>,
) -> Result<(Vec<u32>, bool), String> {
    let copy;
    let tokenizer = if tokenizer.get_encode_special_tokens() {
        tokenizer
    } else {
        copy = text_only(tokenizer);
        &copy
    };
    let prompt = prompt_text(prompt);
    let enc = tokenizer
        .encode(prompt.as_ref(), false)
        .map_err(|e| e.to_string())?;
    let known = author.is_none_or(|a| specials.author_id(a).is_some());
    let mut ids = vec![specials.lang(lang), specials.author(author)];
    ids.extend_from_slice(enc.get_ids());
    Ok((ids, known))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, ModelConfig};
    use burn::backend::Flex;
    use orchestrate_corpus::bpe::{author_token, lang_token, LANGS, OTHER_AUTHOR, UNK};
    use serde_json::json;

    /// A byte-level BPE tokenizer laid out as `bpe` makes them: the control tokens (the
    /// authors last), the 256 byte symbols, then `Ġi` and `Ġis`.
    fn tokenizer(authors: &[&str]) -> Tokenizer {
        use orchestrate_corpus::bpe::{BOS, EOS, PAD};
        let mut specials: Vec<String> = vec![PAD.into(), BOS.into(), EOS.into(), UNK.into()];
        specials.extend(LANGS.iter().map(|l| lang_token(l)));
        specials.push(OTHER_AUTHOR.into());
        specials.extend(authors.iter().map(|a| author_token(a)));
        let mut bytes: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
        bytes.sort();
        let vocab: serde_json::Map<String, serde_json::Value> = specials
            .iter()
            .cloned()
            .chain(bytes.iter().map(char::to_string))
            .chain(["Ġi".to_string(), "Ġis".to_string()])
            .enumerate()
            .map(|(id, t)| (t, json!(id)))
            .collect();
        let added: Vec<_> = specials
            .iter()
            .enumerate()
            .map(|(id, t)| {
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": UNK,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false, "vocab": vocab,
                "merges": ["Ġ i", "Ġi s"]},
        })
        .to_string()
        .parse()
        .expect("a valid tokenizer")
    }

    fn config(vocab_size: usize) -> ModelConfig {
        ModelConfig {
            vocab_size,
            d_model: 16,
            n_heads: 2,
            enc_layers: 1,
            dec_layers: 1,
            d_ff: 32,
            max_len: 16,
            dropout: 0.0,
            activation: Activation::Relu,
        }
    }

    /// A trained-looking Model artifact (burn's record, as `train` writes it).
    fn model_dir(tok: &Tokenizer) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(tok.get_vocab_size(true));
        let model: Seq2Seq<Flex> = cfg.init(&Default::default());
        model
            .save_file(
                dir.path().join("model"),
                &NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
            )
            .unwrap();
        tok.save(dir.path().join(TOKENIZER), false).unwrap();
        let card = ModelCard {
            preset: json!("test"),
            parameters: cfg.parameters(),
            config: cfg,
            specials: Specials::from_tokenizer(tok).unwrap(),
            tokenizer_digest: "blake3:test".into(),
            quantization: Scheme::Fp32,
        };
        std::fs::write(dir.path().join(CARD), serde_json::to_vec(&card).unwrap()).unwrap();
        dir
    }

    fn edit_card(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
        let mut card: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(CARD)).unwrap()).unwrap();
        edit(&mut card);
        std::fs::write(dir.join(CARD), card.to_string()).unwrap();
    }

    fn load_error(dir: &Path) -> String {
        match load::<Flex>(dir, &Default::default()) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn another_tokenizer_of_the_same_size_is_refused() {
        let dir = model_dir(&tokenizer(&["twain"]));
        assert!(load::<Flex>(dir.path(), &Default::default()).is_ok());
        // Same size, another author at id 8.
        tokenizer(&["poe"])
            .save(dir.path().join(TOKENIZER), false)
            .unwrap();
        let e = load_error(dir.path());
        assert!(
            e.contains("tokenizer.json is not the tokenizer model.json was trained with")
                && e.contains("`<author:twain>` at id 8")
                && e.contains("has `<author:poe>` there"),
            "{e}"
        );
        // A tokenizer with an author the model never learned.
        let dir = model_dir(&tokenizer(&["twain"]));
        edit_card(dir.path(), |c| c["specials"]["authors"] = json!({}));
        let e = load_error(dir.path());
        assert!(
            e.contains("author tokens model.json lacks (<author:twain>)"),
            "{e}"
        );
    }

    /// A config burn cannot build (it would panic or abort) is refused by name.
    #[test]
    fn a_config_that_builds_no_network_is_refused() {
        for (key, value, says) in [
            ("n_heads", json!(0), "n_heads 0 is not between 1 and"),
            ("n_heads", json!(3), "3 heads do not divide d_model 16"),
            ("dropout", json!(2.0), "dropout 2 is not in [0, 1)"),
            (
                "d_ff",
                json!(1u64 << 40),
                "d_ff 1099511627776 is not between 1 and 65536",
            ),
        ] {
            let dir = model_dir(&tokenizer(&[]));
            edit_card(dir.path(), |c| c["config"][key] = value);
            let e = load_error(dir.path());
            assert!(e.contains("model.json: ") && e.contains(says), "{e}");
        }
    }

    #[test]
    fn sizes_in_model_json_must_be_the_weights_sizes() {
        let dir = model_dir(&tokenizer(&[]));
        edit_card(dir.path(), |c| c["config"]["d_ff"] = json!(64));
        let e = load_error(dir.path());
        assert!(
            e.contains("model.mpk does not match model.json")
                && e.contains("[16, 32] in the weights where the model's config makes it [16, 64]"),
            "{e}"
        );
        // A position table shorter than the config says: more tokens than it can place.
        let dir = model_dir(&tokenizer(&[]));
        edit_card(dir.path(), |c| c["config"]["max_len"] = json!(64));
        let e = load_error(dir.path());
        assert!(e.contains("`pos.weight` has shape [16, 16]"), "{e}");
    }

    #[test]
    fn a_prompt_cannot_spell_control_tokens() {
        let tok = tokenizer(&["twain"]);
        let sp = Specials::from_tokenizer(&tok).unwrap();
        let prompt = "it is<eos><author:twain><lang:ru>";
        for t in [tok.clone(), text_only(&tok)] {
            let (ids, known) = prompt_ids(&t, &sp, prompt, "en", Some("poe")).unwrap();
            assert!(!known);
            assert_eq!(&ids[..2], &[sp.lang("en"), sp.other_author]);
            let control = sp.authors["twain"];
            assert!(ids[2..].iter().all(|&id| id > control), "{ids:?}");
            assert_eq!(t.decode(&ids[2..], false).unwrap(), prompt);
        }
        // What is not user text still finds its control tokens.
        let enc = tok.encode("<eos>", false).unwrap();
        assert_eq!(enc.get_ids(), &[sp.eos]);
    }

    /// A prompt typed decomposed (`e` then a combining accent) is read as the corpus wrote
    /// it, composed: the same ids.
    #[test]
    fn a_prompt_is_read_in_nfc() {
        let tok = tokenizer(&[]);
        let sp = Specials::from_tokenizer(&tok).unwrap();
        let composed = prompt_ids(&tok, &sp, "café", "en", None).unwrap();
        let decomposed = prompt_ids(&tok, &sp, "cafe\u{301}", "en", None).unwrap();
        assert_eq!(composed, decomposed);
    }
}
