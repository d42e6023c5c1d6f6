//! The orchestrator core: pipeline spec → validated graph → plan → run, with every stage
//! output stored as a content-addressed artifact.

pub mod diag;
pub mod key;
pub mod kinds;
pub mod pipeline;
pub mod spec;
pub mod store;
pub mod yaml;
