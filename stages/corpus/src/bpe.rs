//! The `bpe` stage: a byte-level BPE tokenizer trained on the corpus's train split, with the
//! control tokens the model is conditioned on (`<lang:ru>`, `<author:Mark Twain>`, ...).
//!
//! Byte-level means every input byte has a token, so no text is ever unknown. Training
//! streams the Parquet shards through a bounded channel, so the corpus is never in memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use arrow::array::{Array, StringArray};
use orchestrate_stage::{
    canonical_params, ArtifactKind, InputDecl, Inputs, ParamError, ParamProblem, PathSegment,
    StageContext, StageDescriptor, StageError, StageOutput,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde::{Deserialize, Serialize};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};

pub const PAD: &str = "<pad>";
pub const BOS: &str = "<bos>";
pub const EOS: &str = "<eos>";
pub const UNK: &str = "<unk>";
pub const LANGS: [&str; 3] = ["ru", "en", "other"];
pub const OTHER_AUTHOR: &str = "<author:other>";

pub fn lang_token(lang: &str) -> String {
    format!("<lang:{lang}>")
}

pub fn author_token(author: &str) -> String {
    format!("<author:{author}>")
}

/// An author's name as spellings of it are compared: letters lower-cased, whitespace left
/// out. The corpora write one author several ways (`Неизвестный автор` and `неизвестный
/// автор`, `Л.Н.Толстой` and `Л. Н. Толстой`): those share one author token, named by
/// the most frequent spelling, and a request may name the author any of these ways.
fn author_key(name: &str) -> impl Iterator<Item = char> + Clone + '_ {
    // In NFC, as ingest wrote the names: `Honoré` typed decomposed (as macOS does) is the
    // corpus's `Honoré`.
    use unicode_normalization::UnicodeNormalization;
    name.nfc()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
}

/// Whether two names are spellings of one author (see [`author_key`]).
pub fn same_author(a: &str, b: &str) -> bool {
    author_key(a).eq(author_key(b))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BpeParams {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Pairs seen fewer times than this are not merged.
    #[serde(default = "default_min_frequency")]
    pub min_frequency: u64,
    /// How many of the most frequent authors get their own `<author:NAME>` token.
    #[serde(default = "default_author_tokens")]
    pub author_tokens: usize,
}

fn default_vocab() -> usize {
    8000
}
fn default_min_frequency() -> u64 {
    2
}
fn default_author_tokens() -> usize {
    64
}

pub const DESCRIPTOR: StageDescriptor = StageDescriptor {
    kind: "bpe",
    about: "trains a byte-level BPE tokenizer with language and author control tokens",
    inputs: Inputs::Typed(&[InputDecl {
        name: "corpus",
        kind: ArtifactKind::Corpus,
        many: false,
        required: true,
        reads: &[],
    }]),
    output: ArtifactKind::Tokenizer,
    device_dependent: false,
    names_in_output: false,
    code_hash: env!("STAGE_CODE_HASH"),
    tracked_files: &["tokenizer.json", "tokenizer_meta.json"],
    canonical_params: canonical,
    file_deps: orchestrate_stage::no_file_deps,
    empty_part: orchestrate_stage::no_empty_parts,
    unkeyed: &[],
};

fn canonical(v: serde_json::Value) -> Result<serde_json::Value, ParamError> {
    let v = canonical_params::<BpeParams>(v)?;
    let p: BpeParams = serde_json::from_value(v.clone()).expect("just canonicalised");
    let floor = 256 + 8 + p.author_tokens;
    if p.vocab_size < floor {
        return Err(ParamError {
            path: vec![PathSegment::Key("vocab_size".into())],
            problem: ParamProblem::Invalid(format!(
                "vocab_size {} is too small: the 256 byte tokens, the special tokens and {} author tokens need at least {floor}",
                p.vocab_size, p.author_tokens
            )),
        });
    }
    Ok(v)
}

type Bpe = TokenizerImpl<
    BPE,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Token statistics on the validation split, per language.
#[derive(Debug, Default, Serialize)]
pub struct LangReport {
    pub records: u64,
    pub tokens: u64,
    pub words: u64,
    pub chars: u64,
    pub tokens_per_word: f64,
    pub tokens_per_char: f64,
}

pub fn run(ctx: &StageContext<'_>) -> Result<StageOutput, StageError> {
    let p: BpeParams = ctx.params()?;
    let corpus = ctx.input("corpus")?;
    let shards = shard_files(&corpus.dir)?;
    let started = std::time::Instant::now();

    let authors = top_authors(&shards, p.author_tokens)?;
    let mut specials: Vec<String> = vec![PAD.into(), BOS.into(), EOS.into(), UNK.into()];
    specials.extend(LANGS.iter().map(|l| lang_token(l)));
    specials.push(OTHER_AUTHOR.into());
    specials.extend(authors.iter().map(|(a, _)| author_token(a)));
    ctx.events.log(&format!(
        "{} author tokens; training to {} tokens",
        authors.len(),
        p.vocab_size
    ));

    let mut tokenizer: Bpe = TokenizerBuilder::new()
        .with_model(BPE::builder().unk_token(UNK.into()).build().map_err(fail)?)
        .with_normalizer(None)
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(
            ByteLevel::default().add_prefix_space(false),
        )))
        .with_post_processor(None)
        .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())))
        .build()
        .map_err(fail)?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(p.vocab_size)
        .min_frequency(p.min_frequency)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(s.clone(), true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .build();

    let texts = stream_texts(shards.clone(), "train");
    tokenizer.train(&mut trainer, texts.iter()).map_err(fail)?;
    texts.finish()?;
    ctx.checkpoint()?;
    let train_secs = started.elapsed().as_secs_f64();

    let path = ctx.out_dir.join("tokenizer.json");
    tokenizer.save(&path, false).map_err(fail)?;

    // Report on the validation split what the model will see: its text split as text, a
    // record saying `<eos>` in three pieces, as training and serving split it.
    let mut tokenizer = tokenizer;
    tokenizer.set_encode_special_tokens(true);
    let unk_id = tokenizer.token_to_id(UNK);
    let mut per_lang: BTreeMap<String, LangReport> = BTreeMap::new();
    let mut unknown = 0u64;
    let mut total = 0u64;
    for (text, lang) in read_column_pairs(&shards, "val")? {
        let enc = tokenizer.encode(text.as_str(), false).map_err(fail)?;
        let ids = enc.get_ids();
        unknown += ids.iter().filter(|&&i| Some(i) == unk_id).count() as u64;
        total += ids.len() as u64;
        let r = per_lang.entry(lang).or_default();
        r.records += 1;
        r.tokens += ids.len() as u64;
        r.words += text.split_whitespace().count() as u64;
        r.chars += text.chars().count() as u64;
    }
    for r in per_lang.values_mut() {
        r.tokens_per_word = r.tokens as f64 / r.words.max(1) as f64;
        r.tokens_per_char = r.tokens as f64 / r.chars.max(1) as f64;
    }
    let unk_rate = unknown as f64 / total.max(1) as f64;
    let vocab = tokenizer.get_vocab_size(true);

    let special_ids: BTreeMap<String, u32> = specials
        .iter()
        .filter_map(|s| tokenizer.token_to_id(s).map(|id| (s.clone(), id)))
        .collect();
    let meta = serde_json::json!({
        "vocab_size": vocab,
        "pad": PAD, "bos": BOS, "eos": EOS, "unk": UNK,
        "languages": LANGS,
        "authors": authors.iter().map(|(a, n)| serde_json::json!({"name": a, "records": n, "token": author_token(a)})).collect::<Vec<_>>(),
        "special_ids": special_ids,
    });
    std::fs::write(
        ctx.out_dir.join("tokenizer_meta.json"),
        serde_json::to_vec_pretty(&meta).expect("plain JSON"),
    )
    .map_err(|e| StageError::io("cannot write tokenizer_meta.json", e))?;

    ctx.events.metric("vocab_size", vocab as f64, None);
    ctx.events.metric("unk_rate", unk_rate, None);
    ctx.events.metric("train_seconds", train_secs, None);
    for (lang, r) in &per_lang {
        ctx.events
            .metric(&format!("tokens_per_word_{lang}"), r.tokens_per_word, None);
        ctx.events
            .metric(&format!("tokens_per_char_{lang}"), r.tokens_per_char, None);
    }
    ctx.events.log(&format!(
        "vocab {vocab}, trained in {train_secs:.1}s, unknown-token rate {unk_rate:.4}; tokens/word: {}",
        per_lang.iter().map(|(l, r)| format!("{l} {:.2}", r.tokens_per_word)).collect::<Vec<_>>().join(", ")
    ));
    let mut out = StageOutput::default();
    out.metadata.insert("vocab_size".into(), vocab.into());
    out.metadata.insert("unk_rate".into(), unk_rate.into());
    out.metadata.insert("authors".into(), authors.len().into());
    out.metadata.insert(
        "validation".into(),
        serde_json::to_value(&per_lang).expect("plain JSON"),
    );
    Ok(out)
}

fn fail(e: impl std::fmt::Display) -> StageError {
    StageError::Failed(format!("tokenizer: {e}"))
}

/// The corpus artifact's Parquet shards, in order.
pub fn shard_files(corpus: &Path) -> Result<Vec<PathBuf>, StageError> {
    let dir = corpus.join(crate::SHARD_DIR);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| {
            StageError::io(
                format!("the corpus has no shard directory {}", dir.display()),
                e,
            )
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(StageError::Failed(format!(
            "the corpus has no shards in {}",
            dir.display()
        )));
    }
    Ok(files)
}

/// Reads only the named columns of every shard, calling `f` per batch.
pub(crate) fn scan(
    shards: &[PathBuf],
    columns: &[&str],
    mut f: impl FnMut(&[Option<&StringArray>]) -> bool,
) -> Result<(), StageError> {
    for shard in shards {
        let bad = |e: &dyn std::fmt::Display| {
            StageError::Failed(format!("cannot read {}: {e}", shard.display()))
        };
        let file = std::fs::File::open(shard)
            .map_err(|e| StageError::io(format!("cannot open {}", shard.display()), e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| bad(&e))?;
        let schema = builder.parquet_schema();
        let indices: Vec<usize> = columns
            .iter()
            .filter_map(|c| schema.columns().iter().position(|d| d.name() == *c))
            .collect();
        let mask = ProjectionMask::leaves(schema, indices);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(4096)
            .build()
            .map_err(|e| bad(&e))?;
        for batch in reader {
            let batch = batch.map_err(|e| bad(&e))?;
            let cols: Vec<Option<&StringArray>> = columns
                .iter()
                .map(|c| {
                    batch
                        .column_by_name(c)
                        .and_then(|a| a.as_any().downcast_ref::<StringArray>())
                })
                .collect();
            if !f(&cols) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The `n` most frequent authors in the train split, ties broken by name; an author's
/// spellings (see [`author_key`]) counted together, under the most frequent of them.
fn top_authors(shards: &[PathBuf], n: usize) -> Result<Vec<(String, u64)>, StageError> {
    let mut counts: HashMap<String, u64> = HashMap::new();
    scan(shards, &["author", "split"], |cols| {
        if let (Some(a), Some(s)) = (cols[0], cols[1]) {
            for i in 0..a.len() {
                if !a.is_null(i) && s.value(i) == "train" {
                    *counts.entry(a.value(i).to_string()).or_default() += 1;
                }
            }
        }
        true
    })?;
    // Spellings by count (then by name), so each author's first is the one it is named by.
    let mut spellings: Vec<(String, u64)> = counts.into_iter().collect();
    spellings.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut authors: Vec<(String, u64)> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    // A corpus author written `other` (or `Other`) is not the generic token's: it would
    // take a second `<author:other>`, or a request asking for `other` would reach it.
    let other: String = author_key("other").collect();
    for (name, count) in spellings {
        let key: String = author_key(&name).collect();
        if key == other {
            continue;
        }
        match by_key.get(&key) {
            Some(&at) => authors[at].1 += count,
            None => {
                by_key.insert(key, authors.len());
                authors.push((name, count));
            }
        }
    }
    authors.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    authors.truncate(n);
    Ok(authors)
}

fn read_column_pairs(shards: &[PathBuf], split: &str) -> Result<Vec<(String, String)>, StageError> {
    let mut out = Vec::new();
    scan(shards, &["text", "lang", "split"], |cols| {
        if let (Some(t), Some(l), Some(s)) = (cols[0], cols[1], cols[2]) {
            for i in 0..t.len() {
                if s.value(i) == split {
                    out.push((t.value(i).to_string(), l.value(i).to_string()));
                }
            }
        }
        true
    })?;
    Ok(out)
}

/// Texts of one split, read on another thread and handed over through a bounded channel:
/// the trainer sees an iterator, memory holds at most a few batches.
pub struct TextStream {
    rx: std::sync::Mutex<Option<std::sync::mpsc::Receiver<String>>>,
    error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl TextStream {
    pub fn iter(&self) -> std::sync::mpsc::IntoIter<String> {
        self.rx
            .lock()
            .expect("not poisoned")
            .take()
            .expect("a text stream is read once")
            .into_iter()
    }

    /// Whether the reader thread stopped on an error (rather than at the end of the data).
    pub fn finish(&self) -> Result<(), StageError> {
        match self.error.lock().expect("not poisoned").take() {
            Some(e) => Err(StageError::Failed(format!(
                "reading the corpus failed: {e}"
            ))),
            None => Ok(()),
        }
    }
}

pub fn stream_texts(shards: Vec<PathBuf>, split: &'static str) -> TextStream {
    let (tx, rx) = sync_channel::<String>(8192);
    let error = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = std::sync::Arc::clone(&error);
    std::thread::spawn(move || {
        let result = scan(&shards, &["text", "split"], |cols| {
            if let (Some(t), Some(s)) = (cols[0], cols[1]) {
                for i in 0..t.len() {
                    if s.value(i) == split && tx.send(t.value(i).to_string()).is_err() {
                        return false;
                    }
                }
            }
            true
        });
        if let Err(e) = result {
            *seen.lock().expect("not poisoned") = Some(e.to_string());
        }
    });
    TextStream {
        rx: std::sync::Mutex::new(Some(rx)),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{run_stage, tempdir, write_fortunes};
    use tokenizers::Tokenizer;

    fn corpus(d: &Path) -> PathBuf {
        write_fortunes(d);
        // Enough text for merges: repeat the fortunes with variations.
        let mut big = String::new();
        for i in 0..300 {
            big.push_str(&format!("Record {i}: time flies like an arrow, время летит как стрела {i}.\n\t\t-- Author{}\n%\n", i % 5));
        }
        std::fs::write(d.join("big.txt"), big).unwrap();
        let params =
            serde_json::json!({"sources": [{"path": "*.txt"}], "split": {"val": 0.2, "test": 0.0}});
        let (r, _) = run_stage(
            &crate::ingest::DESCRIPTOR,
            crate::ingest::run,
            params,
            d,
            &[],
        );
        r.unwrap();
        let c = d.join("corpus");
        let _ = std::fs::remove_dir_all(&c);
        std::fs::rename(d.join("out"), &c).unwrap();
        c
    }

    #[test]
    fn trains_a_tokenizer_with_control_tokens_and_no_unknowns() {
        let d = tempdir("bpe");
        let c = corpus(&d);
        let params = serde_json::json!({"vocab_size": 400, "author_tokens": 3, "min_frequency": 1});
        let (r, ev) = run_stage(
            &DESCRIPTOR,
            run,
            params,
            &d,
            &[("corpus", ArtifactKind::Corpus, &c)],
        );
        let out = r.unwrap();
        assert_eq!(out.metadata["unk_rate"], 0.0);
        let tok = Tokenizer::from_file(d.join("out/tokenizer.json")).unwrap();
        assert_eq!(tok.token_to_id(PAD), Some(0));
        assert_eq!(tok.token_to_id(EOS), Some(2));
        assert_eq!(tok.token_to_id("<lang:ru>"), Some(4));
        assert_eq!(tok.token_to_id(OTHER_AUTHOR), Some(7));
        // Three tokens go to three of the five authors of 60 records each, whichever the split
        // left most of in train.
        let frequent = (0..5)
            .filter(|i| tok.token_to_id(&format!("<author:Author{i}>")).is_some())
            .count();
        assert_eq!(frequent, 3);
        assert!(tok.get_vocab_size(true) <= 400);
        for text in [
            "время летит как стрела",
            "time flies like an arrow",
            "ünïcödé ✓ 🦀",
        ] {
            let enc = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        }
        let metrics = ev.metrics.lock().unwrap();
        assert!(metrics["tokens_per_word_en"] > 0.9, "{metrics:?}");
    }

    #[test]
    fn same_corpus_and_params_give_a_byte_identical_tokenizer() {
        let d = tempdir("bpe-determinism");
        let c = corpus(&d);
        let params = serde_json::json!({"vocab_size": 500, "author_tokens": 4});
        let mut files = Vec::new();
        for _ in 0..2 {
            let (r, _) = run_stage(
                &DESCRIPTOR,
                run,
                params.clone(),
                &d,
                &[("corpus", ArtifactKind::Corpus, &c)],
            );
            r.unwrap();
            files.push(std::fs::read(d.join("out/tokenizer.json")).unwrap());
        }
        assert_eq!(files[0], files[1]);
    }

    #[test]
    fn an_author_s_spellings_share_one_token_named_by_the_most_frequent() {
        assert!(same_author("Л.Н.Толстой", "Л. Н. Толстой"));
        assert!(same_author("Неизвестный автор", "неизвестный  автор"));
        assert!(!same_author("Лев Толстой", "Л.Н.Толстой"));
        // Typed decomposed (e and a combining accent), as the corpus writes it composed.
        assert!(same_author("Honore\u{301} de Balzac", "Honoré de Balzac"));
        let d = tempdir("bpe-spellings");
        let mut text = String::new();
        let mut add = |author: &str, n: usize| {
            for i in 0..n {
                text += &format!(
                    "A saying number {i} by {author}, long enough to keep.\n\t\t-- {author}\n%\n"
                );
            }
        };
        add("Mark Twain", 30);
        add("mark  twain", 20);
        add("Ambrose Bierce", 40);
        std::fs::write(d.join("quotes.txt"), text).unwrap();
        // Every record in train.
        let params = serde_json::json!({"sources": [{"path": "quotes.txt", "lang": "en"}],
            "split": {"val": 0.0, "test": 0.0}});
        let (r, _) = run_stage(
            &crate::ingest::DESCRIPTOR,
            crate::ingest::run,
            params,
            &d,
            &[],
        );
        r.unwrap();
        let shards = shard_files(&d.join("out")).unwrap();
        let authors = top_authors(&shards, 2).unwrap();
        assert_eq!(
            authors,
            [
                ("Mark Twain".to_string(), 50),
                ("Ambrose Bierce".to_string(), 40)
            ]
        );
    }

    #[test]
    fn a_vocab_too_small_for_the_control_tokens_is_rejected() {
        let e = (DESCRIPTOR.canonical_params)(serde_json::json!({"vocab_size": 100})).unwrap_err();
        assert!(matches!(e.problem, ParamProblem::Invalid(m) if m.contains("too small")));
    }
}
