//! The orchestrator core: pipeline spec → validated graph → plan → run, with every stage
//! output stored as a content-addressed artifact.

pub mod diag;
pub mod exec;
pub mod export;
pub mod gc;
pub mod graph;
pub mod key;
pub mod kinds;
pub mod pipeline;
pub mod plan;
pub mod record;
pub mod report;
pub mod spec;
pub mod store;
pub mod tracking;
pub mod yaml;
