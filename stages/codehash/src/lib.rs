//! Used from a stage crate's `build.rs`: hashes what a stage's results are built from, so
//! that editing a stage invalidates that stage's cached artifacts, and only those.
//!
//! The hash covers the crate's `Cargo.toml` and every file under `src/`; the same for every
//! crate of the workspace it depends on (train reads the corpus crate's Parquet reader); and
//! the exact version and checksum, from `Cargo.lock`, of every registry crate it depends on,
//! directly or not (a `cargo update` of burn can change the numbers). Paths are relative to
//! each crate, walked in sorted order, so the hash is the same on every machine and checkout
//! location.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Hashes the crate at `CARGO_MANIFEST_DIR`, exports the result as the `STAGE_CODE_HASH`
/// environment variable for `env!`, and asks cargo to rerun when any hashed input changes.
pub fn emit() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    let name = std::env::var("CARGO_PKG_NAME").expect("cargo sets this");
    let stage = hash_stage(&root, &name).expect("the stage's sources and Cargo.lock are readable");
    println!("cargo:rustc-env=STAGE_CODE_HASH={}", stage.hash);
    for path in stage.watched {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// A stage's code hash and the paths it was computed from.
pub struct StageHash {
    pub hash: String,
    pub watched: Vec<PathBuf>,
}

/// The hash of crate `name` at `root` with everything it depends on (see the module doc).
/// Without a `Cargo.lock` above `root` (a crate built outside its workspace) only the crate's
/// own source counts.
pub fn hash_stage(root: &Path, name: &str) -> std::io::Result<StageHash> {
    let Some(workspace) = root.ancestors().find(|d| d.join("Cargo.lock").is_file()) else {
        return Ok(StageHash {
            hash: hash_crate(root)?,
            watched: vec![root.join("src"), root.join("Cargo.toml")],
        });
    };
    let lock = fs::read_to_string(workspace.join("Cargo.lock"))?;
    let packages = parse_lock(&lock);
    let members = workspace_members(workspace)?;
    let mut hasher = blake3::Hasher::new();
    let mut watched = vec![workspace.join("Cargo.lock")];
    for id in closure(&packages, name) {
        let p = &packages[id];
        match (&p.checksum, members.get(&p.name)) {
            // A crate of this workspace: its source, as for the stage's own.
            (None, Some(dir)) => {
                hasher.update(format!("{}\0{}\0", p.name, hash_crate(dir)?).as_bytes());
                watched.extend([dir.join("src"), dir.join("Cargo.toml")]);
            }
            // From a registry or git: its exact version and checksum (or source) say it all.
            _ => {
                hasher.update(
                    format!(
                        "{}\0{}\0{}\0{}\0",
                        p.name,
                        p.version,
                        p.source.as_deref().unwrap_or(""),
                        p.checksum.as_deref().unwrap_or("")
                    )
                    .as_bytes(),
                );
            }
        }
    }
    Ok(StageHash {
        hash: hasher.finalize().to_hex()[..16].to_string(),
        watched,
    })
}

/// The hex blake3 of one crate's `Cargo.toml` and `src/` tree.
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

/// One `[[package]]` of a `Cargo.lock`.
#[derive(Debug, Default)]
struct LockedPackage {
    name: String,
    version: String,
    source: Option<String>,
    checksum: Option<String>,
    /// As written: `name`, or `name version` where several versions are locked.
    dependencies: Vec<String>,
}

/// The packages of a `Cargo.lock` (version 3 or 4), read line by line: its format is
/// regular enough that a TOML parser would only add a dependency to every stage's build.
fn parse_lock(text: &str) -> Vec<LockedPackage> {
    let mut out: Vec<LockedPackage> = Vec::new();
    let mut in_deps = false;
    let quoted = |v: &str| v.trim().trim_matches('"').to_string();
    for line in text.lines() {
        let line = line.trim();
        if line == "[[package]]" {
            out.push(LockedPackage::default());
            in_deps = false;
            continue;
        }
        let Some(p) = out.last_mut() else { continue };
        if in_deps {
            if line.starts_with(']') {
                in_deps = false;
            } else {
                p.dependencies.push(quoted(line.trim_end_matches(',')));
            }
            continue;
        }
        match line.split_once(" = ") {
            Some(("name", v)) => p.name = quoted(v),
            Some(("version", v)) => p.version = quoted(v),
            Some(("source", v)) => p.source = Some(quoted(v)),
            Some(("checksum", v)) => p.checksum = Some(quoted(v)),
            Some(("dependencies", v)) => {
                let v = v.trim();
                if v.starts_with('[') && v.ends_with(']') {
                    let inner = &v[1..v.len() - 1];
                    p.dependencies
                        .extend(inner.split(',').map(quoted).filter(|d| !d.is_empty()));
                } else {
                    in_deps = true;
                }
            }
            _ => {}
        }
    }
    out
}

/// Indices of `name` and everything it depends on, directly or not, sorted by name and
/// version (build and dev dependencies included: the lock file does not tell them apart).
fn closure(packages: &[LockedPackage], name: &str) -> Vec<usize> {
    let find = |dep: &str| -> Option<usize> {
        let mut parts = dep.split(' ');
        let n = parts.next()?;
        let version = parts.next();
        packages
            .iter()
            .position(|p| p.name == n && version.is_none_or(|v| p.version == v))
    };
    let mut seen = BTreeSet::new();
    let mut todo: Vec<usize> = find(name).into_iter().collect();
    while let Some(i) = todo.pop() {
        if seen.insert(i) {
            todo.extend(packages[i].dependencies.iter().filter_map(|d| find(d)));
        }
    }
    let mut out: Vec<usize> = seen.into_iter().collect();
    out.sort_by(|&a, &b| {
        (&packages[a].name, &packages[a].version).cmp(&(&packages[b].name, &packages[b].version))
    });
    out
}

/// The workspace's crates, name → folder, from the root `Cargo.toml`'s `members` list (its
/// `dir/*` globs expanded). An explicit member must have a `Cargo.toml` (cargo says so too);
/// a glob's folders without one are passed over.
fn workspace_members(workspace: &Path) -> std::io::Result<BTreeMap<String, PathBuf>> {
    let text = fs::read_to_string(workspace.join("Cargo.toml"))?;
    let mut out = BTreeMap::new();
    // From the `members = [` line itself (not `default-members`, not a comment) to its `]`,
    // comments dropped.
    let mut lines = text.lines().map(|l| l.split('#').next().unwrap_or(""));
    let Some(first) = lines.find(|l| {
        l.trim_start()
            .strip_prefix("members")
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    }) else {
        return Ok(out);
    };
    let mut list = String::new();
    for line in std::iter::once(first).chain(lines) {
        list.push_str(line);
        list.push('\n');
        if line.contains(']') {
            break;
        }
    }
    let inner = list
        .split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(inner, _)| inner)
        .unwrap_or("");
    let mut dirs = Vec::new();
    for member in inner.split(',').map(|m| m.trim().trim_matches(['"', '\''])) {
        match member.strip_suffix("/*") {
            Some(parent) => {
                if let Ok(entries) = fs::read_dir(workspace.join(parent)) {
                    dirs.extend(
                        entries
                            .flatten()
                            .map(|e| e.path())
                            .filter(|d| d.join("Cargo.toml").is_file()),
                    );
                }
            }
            None if !member.is_empty() => dirs.push(workspace.join(member)),
            None => {}
        }
    }
    for dir in dirs {
        let manifest = fs::read_to_string(dir.join("Cargo.toml"))?;
        let name = manifest
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = "))
            .map(|v| v.trim().trim_matches(['"', '\'']).to_string());
        if let Some(name) = name {
            out.insert(name, dir);
        }
    }
    Ok(out)
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

    #[test]
    fn the_lock_file_is_read_with_its_closure() {
        let lock = r#"
version = 4

[[package]]
name = "a"
version = "0.1.0"
dependencies = [
 "b",
 "c 2.0.0",
]

[[package]]
name = "b"
version = "1.0.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "bb"

[[package]]
name = "c"
version = "1.0.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "c1"

[[package]]
name = "c"
version = "2.0.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "c2"
dependencies = ["b"]

[[package]]
name = "unrelated"
version = "1.0.0"
"#;
        let packages = parse_lock(lock);
        assert_eq!(packages.len(), 5);
        let names: Vec<String> = closure(&packages, "a")
            .into_iter()
            .map(|i| format!("{} {}", packages[i].name, packages[i].version))
            .collect();
        assert_eq!(names, vec!["a 0.1.0", "b 1.0.0", "c 2.0.0"]);
        assert_eq!(packages[2].checksum.as_deref(), Some("c1"));
    }

    #[test]
    fn a_dependency_version_or_a_workspace_crate_changes_the_hash() {
        let ws = tempdir("ws");
        let write = |rel: &str, text: &str| {
            let p = ws.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        };
        write(
            "Cargo.toml",
            "[workspace]\n# the members = [...] below\ndefault-members = [\"st\"]\nmembers = [\n  \"st\", # the stage\n  'crates/*',\n]\n",
        );
        write("st/Cargo.toml", "[package]\nname = \"st\"\n");
        write("st/src/lib.rs", "fn st() {}");
        write("crates/lib/Cargo.toml", "[package]\nname = \"lib\"\n");
        write("crates/lib/src/lib.rs", "fn lib() {}");
        let lock = |v: &str| {
            format!(
                "[[package]]\nname = \"st\"\nversion = \"0.1.0\"\ndependencies = [\n \"lib\",\n \"burn\",\n]\n\n[[package]]\nname = \"lib\"\nversion = \"0.1.0\"\n\n[[package]]\nname = \"burn\"\nversion = \"{v}\"\nsource = \"registry+x\"\nchecksum = \"{v}\"\n"
            )
        };
        write("Cargo.lock", &lock("0.21.0"));
        let h = || hash_stage(&ws.join("st"), "st").unwrap().hash;
        let first = h();
        assert_eq!(first, h());
        write("Cargo.lock", &lock("0.21.1"));
        let updated = h();
        assert_ne!(first, updated, "a new burn");
        write("crates/lib/src/lib.rs", "fn lib() { /* changed */ }");
        assert_ne!(updated, h(), "a changed workspace crate the stage uses");
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("codehash-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }
}
