//! Phase three: for each stage, whether its artifact is already stored and, if not, why.
//!
//! A stage's key depends on its inputs' content digests, so a stage downstream of one that
//! must run has no key yet: it is `blocked` until its inputs exist. The executor finishes
//! the job: when a rerun upstream stage reproduces the same digest, the stage below it turns
//! out cached after all.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::diag::suggest;
use crate::key::{file_digest, CacheKey, CacheKeyParts, KEY_FORMAT};
use crate::pipeline::Pipeline;
use crate::store::{Manifest, Store, StoreError};

#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Run only these stages; their inputs must already be stored.
    pub only: Vec<String>,
    /// Rerun this stage and everything downstream of it.
    pub from: Option<String>,
    /// Run these stages and what they need, nothing else.
    pub until: Vec<String>,
    pub force: Vec<String>,
    pub force_all: bool,
    /// Verify cached artifacts' blobs and rebuild the corrupt ones.
    pub repair: bool,
    /// Planning only (`plan --repair`): corrupt artifacts are found and reported, and left
    /// in the store for the run that rebuilds them.
    pub dry_run: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Cached,
    WillRun,
    /// Waits for an upstream stage that will run; its key is known only after that.
    Blocked,
    NotSelected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Cached => "cached",
            Status::WillRun => "will run",
            Status::Blocked => "blocked",
            Status::NotSelected => "not selected",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct StagePlan {
    pub stage: String,
    pub kind: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<CacheKey>,
    /// Why the stage will run; empty otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// The upstream stages a blocked stage waits for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waits_for: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    #[serde(skip)]
    pub manifest: Option<Manifest>,
    /// The key's parts, when the plan could compute them (not blocked): the executor reuses
    /// them rather than hashing the stage's files (or listing its remote sources) again.
    #[serde(skip)]
    pub parts: Option<CacheKeyParts>,
    #[serde(skip)]
    pub forced: bool,
    /// Asked for by name (`--force S`, `--force-all`): this run's output replaces one that
    /// differs under the same key. (`--from` reruns without replacing.)
    #[serde(skip)]
    pub replace: bool,
    #[serde(skip)]
    pub selected: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub pipeline: String,
    pub store: String,
    pub stages: Vec<StagePlan>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("unknown stage `{name}` in {flag}{}", hint.as_ref().map(|h| format!("; {h}")).unwrap_or_default())]
    UnknownStage {
        flag: &'static str,
        name: String,
        hint: Option<String>,
    },
    /// Several stage names on the command line that the pipeline does not have, each as
    /// [`PlanError::UnknownStage`] says one.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\nerror: "))]
    UnknownStages(Vec<PlanError>),
    #[error("stage `{stage}` reads `{file}`, which cannot be read: {reason}")]
    Dependency {
        stage: String,
        file: String,
        reason: String,
    },
    /// A remote source that could not be listed (the service unreachable, refusing, timing
    /// out): the store's kind of failure, retried by whoever retries those (exit 3), not a
    /// mistake in the pipeline.
    #[error("stage `{stage}` reads `{file}`, which could not be listed: {source}")]
    SourceUnreachable {
        stage: String,
        file: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("stage `{stage}` needs `{upstream}`, which is not in the store and is not selected to run; run it first, or select it too")]
    MissingUpstream { stage: String, upstream: String },
    #[error("the stored manifest of stage `{stage}` is damaged: {source}; run again with --repair to set it aside and rerun the stage (or `orchestrate fsck --repair`)")]
    DamagedManifest {
        stage: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("--force {} names {} the selection (--only, --until, --from) leaves out, so nothing would be forced; select {} too, or leave --force out", .0.join(" --force "), if .0.len() == 1 { "a stage" } else { "stages" }, if .0.len() == 1 { "it" } else { "them" })]
    ForcedNotSelected(Vec<String>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Selection {
    /// Every stage name the selection gives that `p` does not have, at once, before anything
    /// else is looked at (a typo'd `--only` is the command line's mistake, exit 2, even
    /// where the store cannot be reached).
    pub fn check_names(&self, p: &Pipeline) -> Result<(), PlanError> {
        let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
        let given = [
            ("--only", &self.only),
            ("--until", &self.until),
            ("--force", &self.force),
        ]
        .into_iter()
        .flat_map(|(flag, ns)| ns.iter().map(move |n| (flag, n)))
        .chain(self.from.iter().map(|n| ("--from", n)));
        let mut unknown: Vec<PlanError> = given
            .filter(|(_, n)| p.stage_index(n).is_none())
            .map(|(flag, n)| PlanError::UnknownStage {
                flag,
                name: n.clone(),
                hint: suggest(n, &names),
            })
            .collect();
        match unknown.len() {
            0 => {}
            1 => return Err(unknown.remove(0)),
            _ => return Err(PlanError::UnknownStages(unknown)),
        }
        // `--only b --force c` would run b and say nothing of c.
        let selected = self.selected(p);
        let left_out: Vec<String> = self
            .force
            .iter()
            .filter(|n| p.stage_index(n).is_some_and(|i| !selected[i]))
            .cloned()
            .collect();
        if left_out.is_empty() {
            Ok(())
        } else {
            Err(PlanError::ForcedNotSelected(left_out))
        }
    }

    /// Which stages the selection runs (or finds cached), by index; its names known.
    fn selected(&self, p: &Pipeline) -> Vec<bool> {
        let everything = self.only.is_empty() && self.from.is_none() && self.until.is_empty();
        let mut selected = vec![everything; p.stages.len()];
        for i in self.only.iter().filter_map(|n| p.stage_index(n)) {
            selected[i] = true;
        }
        for end in self.until.iter().filter_map(|n| p.stage_index(n)) {
            for i in ancestors(p, end) {
                selected[i] = true;
            }
        }
        if let Some(start) = self.from.as_ref().and_then(|n| p.stage_index(n)) {
            for i in descendants(p, start) {
                selected[i] = true;
            }
        }
        selected
    }
}

impl Plan {
    pub async fn build(p: &Pipeline, store: &Store, sel: &Selection) -> Result<Plan, PlanError> {
        let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
        let check = |flag: &'static str, n: &String| -> Result<usize, PlanError> {
            p.stage_index(n).ok_or_else(|| PlanError::UnknownStage {
                flag,
                name: n.clone(),
                hint: suggest(n, &names),
            })
        };
        sel.check_names(p)?;
        let selected = sel.selected(p);
        let mut forced = vec![sel.force_all; p.stages.len()];
        for n in &sel.force {
            forced[check("--force", n)?] = true;
        }
        if let Some(from) = &sel.from {
            for i in descendants(p, check("--from", from)?) {
                forced[i] = true;
            }
        }

        let mut stages: Vec<StagePlan> = Vec::with_capacity(p.stages.len());
        for (i, s) in p.stages.iter().enumerate() {
            stages.push(StagePlan {
                stage: s.name.clone(),
                kind: s.kind.name().to_string(),
                status: Status::NotSelected,
                key: None,
                reasons: Vec::new(),
                waits_for: Vec::new(),
                artifact: None,
                manifest: None,
                parts: None,
                forced: forced[i],
                replace: sel.force_all || sel.force.contains(&s.name),
                selected: selected[i],
            });
        }
        for &i in &p.order {
            let pending: Vec<String> = p
                .upstream(i)
                .into_iter()
                .filter(|&u| stages[u].manifest.is_none())
                .map(|u| p.stages[u].name.clone())
                .collect();
            if !pending.is_empty() {
                if selected[i] {
                    stages[i].status = Status::Blocked;
                    stages[i].waits_for = pending;
                }
                continue;
            }
            let parts = key_parts(p, i, |u| {
                stages[u].manifest.as_ref().map(|m| m.digest.clone())
            })
            .await?;
            let key = parts.key();
            let mut manifest = match store.manifest(&key).await {
                Ok(m) => m,
                // A manifest that does not parse, or whose digest does not match its files:
                // `--repair` sets it aside and reruns the stage.
                Err(e) if e.is_damage() && sel.repair => {
                    if !sel.dry_run {
                        store.delete_manifest(&key).await?;
                    }
                    stages[i]
                        .reasons
                        .push(format!("stored manifest was damaged: {e}"));
                    None
                }
                Err(e) if e.is_damage() => {
                    return Err(PlanError::DamagedManifest {
                        stage: p.stages[i].name.clone(),
                        source: Box::new(e),
                    })
                }
                Err(e) => return Err(e.into()),
            };
            if let (true, Some(m)) = (sel.repair, &manifest) {
                let bad = store.verify(m).await?;
                if !bad.is_empty() {
                    if !sel.dry_run {
                        store.discard_corrupt(m, &bad).await?;
                    }
                    manifest = None;
                    let what: Vec<&str> = bad.iter().map(|(_, why)| why.as_str()).collect();
                    stages[i]
                        .reasons
                        .push(format!("stored artifact was corrupt: {}", what.join("; ")));
                }
            }
            let plan = &mut stages[i];
            plan.key = Some(key.clone());
            plan.parts = Some(parts.clone());
            if !selected[i] {
                plan.artifact = manifest.as_ref().map(|m| m.digest.clone());
                plan.manifest = manifest;
                continue;
            }
            match manifest {
                Some(m) if !forced[i] => {
                    plan.status = Status::Cached;
                    plan.artifact = Some(m.digest.clone());
                    plan.manifest = Some(m);
                }
                existing => {
                    plan.status = Status::WillRun;
                    if forced[i] {
                        plan.reasons.push("forced".into());
                    } else if plan.reasons.is_empty() {
                        plan.reasons = why(store, p, i, &parts).await?;
                    }
                    // Stages below a rerun stage wait for its new digest, even when one is stored.
                    drop(existing);
                    plan.manifest = None;
                }
            }
        }
        // Selected stages whose inputs are neither stored nor going to be produced.
        for &i in &p.order {
            if !selected[i] {
                continue;
            }
            for u in p.upstream(i) {
                if !selected[u] && stages[u].manifest.is_none() {
                    return Err(PlanError::MissingUpstream {
                        stage: p.stages[i].name.clone(),
                        upstream: p.stages[u].name.clone(),
                    });
                }
            }
        }
        Ok(Plan {
            pipeline: p.name.clone(),
            store: store.url().to_string(),
            stages,
        })
    }

    pub fn count(&self, status: Status) -> usize {
        self.stages.iter().filter(|s| s.status == status).count()
    }

    /// The plan as a table, reasons on indented lines below their stage.
    pub fn render(&self) -> String {
        let w_stage = self
            .stages
            .iter()
            .map(|s| s.stage.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let w_kind = self
            .stages
            .iter()
            .map(|s| s.kind.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let mut out = format!(
            "{:<w_stage$}  {:<w_kind$}  {:<12}  WHY\n",
            "STAGE", "KIND", "STATUS"
        );
        for s in &self.stages {
            let why: Vec<String> = match s.status {
                Status::Cached => vec![format!(
                    "artifact {}",
                    short_digest(s.artifact.as_deref().unwrap_or(""))
                )],
                Status::WillRun => s.reasons.clone(),
                Status::Blocked => vec![format!(
                    "waits for {}",
                    s.waits_for
                        .iter()
                        .map(|w| format!("`{w}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )],
                Status::NotSelected => vec![],
            };
            let first = why.first().cloned().unwrap_or_default();
            let row = format!(
                "{:<w_stage$}  {:<w_kind$}  {:<12}  {first}",
                s.stage,
                s.kind,
                s.status.as_str()
            );
            out.push_str(row.trim_end());
            out.push('\n');
            for more in why.iter().skip(1) {
                out.push_str(&format!("{:<w$}  {more}\n", "", w = w_stage + w_kind + 16));
            }
        }
        out.push_str(&format!(
            "{} cached, {} will run, {} blocked\n",
            self.count(Status::Cached),
            self.count(Status::WillRun),
            self.count(Status::Blocked)
        ));
        out
    }
}

pub fn short_digest(d: &str) -> String {
    let hex = d.strip_prefix("blake3:").unwrap_or(d);
    // By characters: a damaged record read from a shared store may hold any text.
    hex.chars().take(12).collect()
}

/// Stage `start` and every stage that depends on it, directly or not.
pub fn descendants(p: &Pipeline, start: usize) -> Vec<usize> {
    let mut out = vec![start];
    let mut i = 0;
    while i < out.len() {
        for d in p.downstream(out[i]) {
            if !out.contains(&d) {
                out.push(d);
            }
        }
        i += 1;
    }
    out
}

/// `start` and every stage it needs, directly or not.
pub fn ancestors(p: &Pipeline, start: usize) -> Vec<usize> {
    let mut out = vec![start];
    let mut i = 0;
    while i < out.len() {
        for u in p.upstream(out[i]) {
            if !out.contains(&u) {
                out.push(u);
            }
        }
        i += 1;
    }
    out
}

/// A stage's canonical params less those its kind says change no byte of the output.
fn keyed_params(params: &serde_json::Value, unkeyed: &[&str]) -> serde_json::Value {
    let mut keyed = params.clone();
    if let Some(map) = keyed.as_object_mut() {
        map.retain(|name, _| !unkeyed.contains(&name.as_str()));
    }
    keyed
}

/// Everything that determines stage `i`'s output, given its inputs' artifact digests.
pub async fn key_parts(
    p: &Pipeline,
    i: usize,
    digest_of: impl Fn(usize) -> Option<String>,
) -> Result<CacheKeyParts, PlanError> {
    let s = &p.stages[i];
    let d = s.kind.descriptor();
    let mut inputs = BTreeMap::new();
    for b in &s.inputs {
        let digests: Vec<String> = b
            .stages
            .iter()
            .map(|&u| digest_of(u).unwrap_or_default())
            .collect();
        inputs.insert(b.name.clone(), digests);
    }
    let files = dependency_digests(p, i).await?;
    Ok(CacheKeyParts {
        format: KEY_FORMAT,
        kind: d.kind.to_string(),
        code: d.code_hash.to_string(),
        params: keyed_params(&s.params, d.unkeyed),
        inputs,
        files,
        device: d.device_dependent.then(|| s.device.class().to_string()),
        names: d.names_in_output.then(|| crate::key::StageNames {
            stage: s.name.clone(),
            inputs: s
                .inputs
                .iter()
                .map(|b| {
                    let producers = b.stages.iter().map(|&u| p.stages[u].name.clone());
                    (b.name.clone(), producers.collect())
                })
                .collect(),
        }),
    })
}

/// The digest of each file stage `i` reads (its `deps`, an ingest's sources), by the name
/// it enters the key under.
pub async fn dependency_digests(
    p: &Pipeline,
    i: usize,
) -> Result<BTreeMap<String, String>, PlanError> {
    let s = &p.stages[i];
    let mut files = BTreeMap::new();
    for f in &s.deps {
        let dependency = |reason: String, file: String| PlanError::Dependency {
            stage: s.name.clone(),
            file,
            reason,
        };
        // Remote sources enter by listing (names, sizes, ETags), not by download.
        let digest = if f.contains("://") {
            crate::store::remote_fingerprint(f)
                .await
                .map_err(|e| match e {
                    // Refused for good (no such bucket, no access, bad credentials): the
                    // pipeline's or its environment's to mend, so not retried (exit 2).
                    StoreError::Backend {
                        source:
                            object_store::Error::NotFound { .. }
                            | object_store::Error::PermissionDenied { .. }
                            | object_store::Error::Unauthenticated { .. },
                        ..
                    } => dependency(e.to_string(), f.clone()),
                    e @ StoreError::Backend { .. } => PlanError::SourceUnreachable {
                        stage: s.name.clone(),
                        file: f.clone(),
                        source: Box::new(e),
                    },
                    e => dependency(e.to_string(), f.clone()),
                })?
        } else {
            // Read off the async threads: a corpus of many MB would hold up the heartbeats
            // and store requests of the stages beside this one.
            let path = p.dir.join(f);
            let read = path.clone();
            tokio::task::spawn_blocking(move || file_digest(&read))
                .await
                .unwrap_or_else(|join| Err(std::io::Error::other(join.to_string())))
                .map_err(|e| dependency(e.to_string(), path.display().to_string()))?
        };
        // `deps` entries are as written (`./extra/f.txt`), ingest's sources joined: both
        // named from the joined path.
        let joined = match f.contains("://") {
            true => f.clone(),
            false => p.dir.join(f).to_string_lossy().into_owned(),
        };
        files.insert(dependency_name(&p.dir, &joined), digest);
    }
    Ok(files)
}

/// The name a file dependency enters the key under. Stages name the files they read by
/// joined path (the pipeline's folder and the source as written); inside that folder the name
/// is relative to it, so two checkouts of one repository, on two machines sharing a store,
/// give the same key. Files outside it (`/usr/share/games/fortunes`) keep their path.
/// Below the folder the name is read lexically (`./extra/f.txt`, `a/../extra/f.txt` and
/// `extra/f.txt` are one name for the same bytes; `../datasets/q.txt` stays as written, the
/// same in every checkout). A URL is its own name.
fn dependency_name(dir: &std::path::Path, f: &str) -> String {
    if f.contains("://") {
        return f.to_string();
    }
    match std::path::Path::new(f).strip_prefix(dir) {
        Ok(relative) => lexically_normal(relative).display().to_string(),
        Err(_) => f.to_string(),
    }
}

/// `path` without `.` components, and each `..` taking the name before it away (where there
/// is one: a leading `..` stays).
fn lexically_normal(path: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.iter().collect()
}

/// Why stage `i` must run: its key compared with the nearest key it had before.
async fn why(
    store: &Store,
    p: &Pipeline,
    i: usize,
    parts: &CacheKeyParts,
) -> Result<Vec<String>, PlanError> {
    let name = &p.stages[i].name;
    let history = store.history(&p.name, name).await?;
    let diffs: Vec<Vec<String>> = history.iter().map(|h| parts.diff(&h.parts, name)).collect();
    // Same key as before, yet no manifest: it was collected or removed.
    if diffs.iter().any(Vec::is_empty) {
        return Ok(vec![
            "artifact no longer in the store (collected by gc, or removed)".into(),
        ]);
    }
    // Newest first, so among equally near keys the most recent wins.
    Ok(match diffs.into_iter().min_by_key(Vec::len) {
        Some(diff) => diff,
        None => vec!["never run".into()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dependency_is_named_alike_however_its_path_is_written() {
        let dir = std::path::Path::new("/work/p");
        for f in [
            "/work/p/extra/f.txt",
            "/work/p/./extra/f.txt",
            "/work/p/a/../extra/f.txt",
            "/work/./p/extra/./f.txt",
        ] {
            assert_eq!(dependency_name(dir, f), "extra/f.txt", "{f}");
        }
        // Outside the folder by `..`: relative still, as in every checkout.
        assert_eq!(dependency_name(dir, "/work/p/../q/f.txt"), "../q/f.txt");
        assert_eq!(
            dependency_name(dir, "/usr/share/games/fortunes/ru"),
            "/usr/share/games/fortunes/ru"
        );
        assert_eq!(
            dependency_name(dir, "s3://corpus/quotes"),
            "s3://corpus/quotes"
        );
    }
}
