//! The model and the `train` stage, and what the stages after it share: the artifact, the
//! weight formats, and the generation that `evaluate`, `deploy` and `orchestrate serve` use,
//! all on one network definition. `quantize` and `evaluate` are crates of their own, so
//! that editing them does not change train's code hash. burn lives only here and in the
//! crates that depend on this one.

pub mod adamw;
pub mod artifact;
pub mod compute;
pub mod data;
mod decode_cpu;
pub mod end_to_end;
mod fused;
pub mod generate;
pub mod model;
mod rowmath;
pub mod train;
pub mod weights;
pub use tokenizers::Tokenizer;

use orchestrate_stage::StageError;

/// The most `threads` a stage takes: a thread each, and tens of thousands would exhaust the
/// process's threads before any work.
pub const MAX_THREADS: usize = 1024;

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
