//! Used from a stage crate's `build.rs`: hashes the crate's own source so that editing a
//! stage invalidates that stage's cached artifacts, and only those.
//!
//! The hash covers `Cargo.toml` (dependency versions change results too) and every file under
//! `src/`, walked in sorted order with paths relative to the crate, so it is the same on every
//! machine and checkout location.

use std::fs;
use std::path::{Path, PathBuf};

/// Hashes the crate at `CARGO_MANIFEST_DIR`, exports the result as the `STAGE_CODE_HASH`
/// environment variable for `env!`, and asks cargo to rerun when the source changes.
pub fn emit() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    let hash = hash_crate(&root).expect("the stage crate's own source is readable");
    println!("cargo:rustc-env=STAGE_CODE_HASH={hash}");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=Cargo.toml");
}

/// The hex blake3 of the crate's `Cargo.toml` and `src/` tree.
pub fn hash_crate(root: &Path) -> std::io::Result<String> {
    let mut files = vec![PathBuf::from("Cargo.toml")];
    collect(root, Path::new("src"), &mut files)?;
    files.sort();
    let mut hasher = blake3::Hasher::new();
    for rel in files {
        let text = fs::read(root.join(&rel))?;
        // Path separators and line endings normalised so Windows checkouts hash the same.
        let name = rel.to_string_lossy().replace('\\', "/");
        hasher.update(name.as_bytes());
        hasher.update(&[0]);
        let text: Vec<u8> = text.into_iter().filter(|&b| b != b'\r').collect();
        hasher.update(&(text.len() as u64).to_le_bytes());
        hasher.update(&text);
    }
    Ok(hasher.finalize().to_hex()[..16].to_string())
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let child = rel.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            collect(root, &child, out)?;
        } else {
            out.push(child);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_changes_with_source_and_not_with_location() {
        let a = tempdir("a");
        let b = tempdir("b");
        for d in [&a, &b] {
            fs::create_dir_all(d.join("src/sub")).unwrap();
            fs::write(d.join("Cargo.toml"), "[package]").unwrap();
            fs::write(d.join("src/lib.rs"), "fn a() {}").unwrap();
            fs::write(d.join("src/sub/x.rs"), "fn x() {}").unwrap();
        }
        assert_eq!(hash_crate(&a).unwrap(), hash_crate(&b).unwrap());
        fs::write(b.join("src/sub/x.rs"), "fn y() {}").unwrap();
        assert_ne!(hash_crate(&a).unwrap(), hash_crate(&b).unwrap());
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("codehash-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }
}
