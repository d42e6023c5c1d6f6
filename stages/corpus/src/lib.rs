//! Phases one and two: `ingest` turns raw text (Debian's fortune files, plain text, JSON
//! Lines, Parquet) into a clean, deduplicated, split corpus of Parquet shards; `bpe` trains
//! the byte-level BPE tokenizer the model uses, streaming those shards.
//!
//! The corpus schema is the contract between the two (and with `train`/`evaluate` later):
//! see [`schema`].

pub mod bpe;
mod formats;
pub mod ingest;
mod lang;
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
/// | `source` | utf8 | the file the record came from |
/// | `split` | utf8 | `train`, `val` or `test`, by record hash |
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
