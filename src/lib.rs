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

/// Writes `bytes` to `path` whole or not at all: into a file beside it, then renamed over it.
/// A path that is there and not a plain file (`/dev/stdout`, a pipe, a link) is written to
/// as it is.
pub fn write_whole(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_file()) {
        return std::fs::write(path, bytes);
    }
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
