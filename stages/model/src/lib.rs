//! The model stages: `train` (this issue), later `quantize`, `evaluate` and serving, all on
//! one network definition. burn lives only here and in the crates that depend on this one.

pub mod data;
pub mod model;
pub mod train;
