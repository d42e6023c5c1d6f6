//! The model stages: `train` (this issue), later `quantize`, `evaluate` and serving, all on
//! one network definition. burn lives only here and in the crates that depend on this one.

pub mod artifact;
mod chart;
pub mod data;
pub mod evaluate;
pub mod generate;
pub mod model;
pub mod quantize;
pub mod train;
pub mod weights;
pub use tokenizers::Tokenizer;
