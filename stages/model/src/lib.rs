//! The model stages: `train`, `quantize` and `evaluate`, and the generation that `evaluate`,
//! `deploy` and `orchestrate serve` share, all on one network definition. burn lives only
//! here and in the crates that depend on this one.

pub mod adamw;
pub mod artifact;
mod chart;
pub mod compute;
pub mod data;
mod decode_cpu;
pub mod end_to_end;
pub mod evaluate;
mod fused;
pub mod generate;
pub mod model;
pub mod quantize;
mod rowmath;
pub mod train;
pub mod weights;
pub use tokenizers::Tokenizer;

use orchestrate_stage::StageError;

/// Runs `f` with tensor work on `threads` threads (a pool of its own), or on every core.
/// One thread makes floating-point sums happen in one order, so results repeat bit for bit.
pub fn with_threads<R: Send>(
    threads: Option<usize>,
    f: impl FnOnce() -> Result<R, StageError> + Send,
) -> Result<R, StageError> {
    match threads {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build()
            .map_err(|e| StageError::Failed(format!("cannot start {n} threads: {e}")))?
            .install(f),
        None => f(),
    }
}
