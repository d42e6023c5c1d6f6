//! Cache keys. One struct lists everything that can change a stage's output; its canonical
//! JSON (struct fields in declaration order, maps sorted) is hashed. Nothing else goes in,
//! so two runs agree on a key exactly when they would compute the same artifact.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Bumped whenever the meaning of a key part changes, which invalidates every cache at once.
pub const KEY_FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheKeyParts {
    pub format: u32,
    /// The stage kind (`shell`, `train`, ...).
    pub kind: String,
    /// Hash of the stage implementation's source, fixed at build time.
    pub code: String,
    /// Canonical params, defaults filled in. `serde_json::Map` is a `BTreeMap` here (the
    /// `preserve_order` feature is off), so key order in the YAML cannot matter.
    pub params: serde_json::Value,
    /// Input name → digests of the bound artifacts, in the order written.
    pub inputs: BTreeMap<String, Vec<String>>,
    /// Local file (as written) → digest of its contents.
    pub files: BTreeMap<String, String>,
    /// `cpu` or `cuda` for stages whose results depend on it; `None` otherwise.
    pub device: Option<String>,
    /// The stage's own name and, per input, its producers' names: only for kinds whose
    /// output shows them (`StageDescriptor::names_in_output`). Left out of the hashed JSON when
    /// absent, so the keys of every other kind are what they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<StageNames>,
}

/// The names a stage's output can show.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageNames {
    pub stage: String,
    /// Input name → the producing stages' names, in the order written.
    pub inputs: BTreeMap<String, Vec<String>>,
}

/// The hex blake3 of a key's parts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CacheKey(pub String);

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl CacheKey {
    pub fn short(&self) -> &str {
        // By characters: a key read back from a damaged record may hold any text.
        self.0
            .char_indices()
            .nth(12)
            .map_or(self.0.as_str(), |(end, _)| &self.0[..end])
    }
}

impl CacheKeyParts {
    pub fn key(&self) -> CacheKey {
        let bytes = serde_json::to_vec(self).expect("key parts are plain JSON");
        CacheKey(blake3::hash(&bytes).to_hex().to_string())
    }

    /// Why `self` differs from an earlier key of the same stage, one line per differing part.
    pub fn diff(&self, before: &CacheKeyParts, stage: &str) -> Vec<String> {
        let mut why = Vec::new();
        if self.format != before.format {
            why.push("cache key format changed".to_string());
        }
        if self.kind != before.kind {
            why.push(format!(
                "stage kind changed: {} → {}",
                before.kind, self.kind
            ));
        } else if self.code != before.code {
            why.push("stage code changed".to_string());
        }
        let mut old = BTreeMap::new();
        let mut new = BTreeMap::new();
        flatten_params(&format!("{stage}.with"), &before.params, &mut old);
        flatten_params(&format!("{stage}.with"), &self.params, &mut new);
        // `plan` prints this to terminals and CI logs: a secret's value shows as `***`,
        // under its own name or inside another value, as in MLflow.
        let mut secrets = crate::tracking::Secrets::from_env();
        for (path, v) in old.iter().chain(&new) {
            if crate::tracking::names_a_secret(path) {
                secrets.add(v);
            }
        }
        let hidden = |path: &str, v: &str| {
            if crate::tracking::names_a_secret(path) {
                "***".to_string()
            } else {
                secrets.hide(v)
            }
        };
        for (path, v) in &new {
            let v_shown = hidden(path, v);
            match old.get(path) {
                Some(o) if o == v => {}
                Some(_) if crate::tracking::names_a_secret(path) => {
                    why.push(format!("param `{path}` changed"))
                }
                Some(o) => why.push(format!("param `{path}` {} → {v_shown}", hidden(path, o))),
                None => why.push(format!("param `{path}` added: {v_shown}")),
            }
        }
        for (path, o) in &old {
            if !new.contains_key(path) {
                why.push(format!("param `{path}` removed (was {})", hidden(path, o)));
            }
        }
        let names: std::collections::BTreeSet<&String> =
            self.inputs.keys().chain(before.inputs.keys()).collect();
        for name in names {
            match (before.inputs.get(name), self.inputs.get(name)) {
                (Some(a), Some(b)) if a == b => {}
                (Some(_), Some(_)) => why.push(format!("input `{name}` changed")),
                (None, Some(_)) => why.push(format!("input `{name}` added")),
                (Some(_), None) => why.push(format!("input `{name}` removed")),
                (None, None) => {}
            }
        }
        let files: std::collections::BTreeSet<&String> =
            self.files.keys().chain(before.files.keys()).collect();
        for f in files {
            match (before.files.get(f), self.files.get(f)) {
                (Some(a), Some(b)) if a == b => {}
                (Some(_), Some(_)) => why.push(format!("file `{f}` changed")),
                (None, Some(_)) => why.push(format!("file `{f}` added")),
                (Some(_), None) => why.push(format!("file `{f}` removed")),
                (None, None) => {}
            }
        }
        if self.names != before.names && self.kind == before.kind {
            let name = |n: &Option<StageNames>| n.as_ref().map(|n| n.stage.clone());
            if before.names.is_none() || self.names.is_none() {
                // A key from before names joined it: nothing was renamed.
                why.push("cache key format changed (stage names now join it)".to_string());
            } else if name(&self.names) != name(&before.names) {
                why.push("stage renamed (its output shows its name)".to_string());
            } else {
                why.push("an input's stage renamed (the output shows its name)".to_string());
            }
        }
        if self.device != before.device {
            why.push(format!(
                "device changed: {} → {}",
                before.device.as_deref().unwrap_or("any"),
                self.device.as_deref().unwrap_or("any")
            ));
        }
        why
    }
}

/// `{"a": {"b": 1}}` under `p` → `p.a.b = 1` (no prefix when `p` is empty); values as
/// compact JSON, strings unquoted. Used for plan's "why" and for MLflow params alike.
pub fn flatten_params(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_params(&key, v, out);
            }
        }
        serde_json::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Hashes a local file for the `files` part of a key.
pub fn file_digest(path: &std::path::Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    Ok(format!("blake3:{}", hasher.finalize().to_hex()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parts(params: serde_json::Value) -> CacheKeyParts {
        CacheKeyParts {
            format: KEY_FORMAT,
            kind: "shell".into(),
            code: "0123456789abcdef".into(),
            params,
            inputs: BTreeMap::from([("a".to_string(), vec!["blake3:aa".to_string()])]),
            files: BTreeMap::new(),
            device: None,
            names: None,
        }
    }

    #[test]
    fn short_forms_cut_by_characters() {
        assert_eq!(CacheKey("0123456789abcdef".into()).short(), "0123456789ab");
        assert_eq!(CacheKey("ключ-ключ-ключ".into()).short(), "ключ-ключ-кл");
        assert_eq!(CacheKey("ab".into()).short(), "ab");
        assert_eq!(
            crate::plan::short_digest("blake3:ключ-ключ-ключ"),
            "ключ-ключ-кл"
        );
    }

    #[test]
    fn known_key_is_pinned() {
        // If this changes, every user's cache is invalidated: bump KEY_FORMAT deliberately.
        let k = parts(json!({"run": "echo hi", "outputs": ["x"]})).key();
        assert_eq!(
            k.0,
            "862dc3b0ab873973febf673f6e74205678e74213f1a8de3705c11e120752f47f"
        );
    }

    #[test]
    fn param_order_does_not_change_the_key() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"run":"x","env":{"B":"1","A":"2"}}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"env":{"A":"2","B":"1"},"run":"x"}"#).unwrap();
        assert_eq!(parts(a).key(), parts(b).key());
    }

    #[test]
    fn diff_names_each_changed_part() {
        let a = parts(json!({"lr": 3e-4, "steps": 10}));
        let mut b = parts(json!({"lr": 1e-4, "steps": 10}));
        b.inputs.insert("a".into(), vec!["blake3:bb".into()]);
        b.code = "ffff".into();
        assert_eq!(
            b.diff(&a, "model"),
            vec![
                "stage code changed".to_string(),
                "param `model.with.lr` 0.0003 → 0.0001".to_string(),
                "input `a` changed".to_string(),
            ]
        );
    }

    #[test]
    fn diff_shows_no_secret() {
        let a = parts(json!({"env": {"HF_TOKEN": "hf_old_value"}, "run": "login hf_old_value"}));
        let b = parts(json!({"env": {"HF_TOKEN": "hf_new_value"}, "run": "login hf_new_value"}));
        let why = b.diff(&a, "fetch");
        assert_eq!(
            why,
            vec![
                "param `fetch.with.env.HF_TOKEN` changed".to_string(),
                "param `fetch.with.run` login *** → login ***".to_string(),
            ]
        );
    }
}
