//! Phases one and two: `ingest` turns raw text (Debian's fortune files, plain text, JSON
//! Lines, Parquet) into a clean, deduplicated, split corpus of Parquet shards; `bpe` trains
//! the byte-level BPE tokenizer the model uses, streaming those shards.
//!
//! The corpus schema is the contract between the two (and with `train`/`evaluate` later):
//! see [`schema`].

pub mod bpe;
mod formats;
pub mod ingest;
/// The corpus is NFC (ingest writes it so): text read against it (a prompt, an author's
/// name in a request) is compared in NFC too.
pub use formats::nfc;
mod lang;
mod remote;
#[cfg(test)]
mod testutil;

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema};

/// Columns of every corpus shard, in order.
///
/// | column | type | meaning |
/// |---|---|---|
/// | `id` | utf8 | 16 hex digits of blake3 over the normalised text; stable across runs |
/// | `text` | utf8 | NFC, whitespace cleaned; attribution lines removed |
/// | `lang` | utf8 | `ru`, `en` or `other` (or what the source fixed) |
/// | `lang_confidence` | float32 | 1.0 when the source fixed the language |
/// | `author` | utf8, nullable | from the attribution line (`-- Mark Twain`) or the source field |
/// | `source` | utf8 | the file the record came from: its source's `path` as written, then the file's path below it (an object's URL for `s3://`) |
/// | `split` | utf8 | `train`, `val` or `test`, by a hash of the record's letters and digits, lower-cased (near-duplicates share a split) |
pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("lang", DataType::Utf8, false),
        Field::new("lang_confidence", DataType::Float32, false),
        Field::new("author", DataType::Utf8, true),
        Field::new("source", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
    ]))
}

/// Where an ingest artifact keeps its shards.
pub const SHARD_DIR: &str = "data";

/// One corpus record, as later stages read it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub text: String,
    pub lang: String,
    pub author: Option<String>,
}

/// The records of one split (`train`, `val`, `test`) of a corpus artifact, in shard order.
pub fn read_split(
    corpus_dir: &std::path::Path,
    split: &str,
) -> Result<Vec<Record>, orchestrate_stage::StageError> {
    use arrow::array::Array;
    let shards = bpe::shard_files(corpus_dir)?;
    let mut out = Vec::new();
    bpe::scan(&shards, &["text", "lang", "author", "split"], |cols| {
        if let (Some(t), Some(l), Some(a), Some(s)) = (cols[0], cols[1], cols[2], cols[3]) {
            for i in 0..t.len() {
                if s.value(i) == split {
                    out.push(Record {
                        text: t.value(i).to_string(),
                        lang: l.value(i).to_string(),
                        author: (!a.is_null(i)).then(|| a.value(i).to_string()),
                    });
                }
            }
        }
        true
    })?;
    Ok(out)
}
