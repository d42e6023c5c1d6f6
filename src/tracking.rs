//! Run tracking in MLflow, through a local spool so nothing is lost.
//!
//! Every record (a run started, params, metrics, tags, an artifact, a run ended) is first
//! appended to `<cache>/spool/<run id>.jsonl`. A background task delivers the spool to the
//! MLflow server in order and remembers, in `<run id>.state.json`, how far it got and which
//! MLflow run each of our runs became. When no server is configured, or it is down or failing
//! mid-run, the records wait in the spool and the run still succeeds; `orchestrate sync`
//! delivers them later. Delivery is idempotent: runs are found again by their
//! `orchestrate.uid` tag instead of being created twice, and a record is marked delivered
//! only after the server accepted it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// MLflow's log-batch limits.
const MAX_METRICS: usize = 1000;
const MAX_PARAMS: usize = 100;
const MAX_TAGS: usize = 100;
/// MLflow rejects longer param values.
const MAX_PARAM_CHARS: usize = 6000;
/// The most characters of a tag value sent (MLflow takes 8000; an error message is cut).
const MAX_TAG_CHARS: usize = 4000;
/// Buffered metrics are flushed to the spool at least this often.
const METRIC_FLUSH: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub key: String,
    pub value: f64,
    pub timestamp: i64,
    pub step: i64,
}

/// One spooled record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    StartRun {
        uid: String,
        parent: Option<String>,
        experiment: String,
        name: String,
        start_ms: i64,
        tags: BTreeMap<String, String>,
    },
    Log {
        uid: String,
        #[serde(default)]
        metrics: Vec<Metric>,
        #[serde(default)]
        params: BTreeMap<String, String>,
        #[serde(default)]
        tags: BTreeMap<String, String>,
    },
    /// `file` is a copy inside the spool, so the record survives the stage's working directory.
    Artifact {
        uid: String,
        file: String,
        path: String,
    },
    EndRun {
        uid: String,
        status: String,
        end_ms: i64,
    },
    /// A new version of registered model `name`, from the artifacts under `path` in run `uid`.
    RegisterModel {
        uid: String,
        name: String,
        path: String,
    },
}

impl Op {
    /// What the record does, for messages: `start of run …`, `artifact stats.json`.
    fn name(&self) -> String {
        match self {
            Op::StartRun { name, .. } => format!("the start of run `{name}`"),
            Op::Log { .. } => "a batch of metrics, params and tags".into(),
            Op::Artifact { path, .. } => format!("artifact `{path}`"),
            Op::EndRun { status, .. } => format!("the run's end ({status})"),
            Op::RegisterModel { name, .. } => format!("a version of model `{name}`"),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    seq: u64,
    #[serde(flatten)]
    op: Op,
}

/// How far a spool file has been delivered.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct DeliveryState {
    delivered: u64,
    /// Where in the spool file the record after `delivered` begins: a delivery reads from
    /// here, not the whole file again (a day's training spools tens of thousands of
    /// records, and delivery runs every second). 0 in a state written before it was kept.
    #[serde(default)]
    offset: u64,
    /// Records the server refused, over every delivery: a spool with any stays, to be read.
    #[serde(default)]
    refused: u64,
    experiments: BTreeMap<String, String>,
    /// Our run uid → (MLflow run id, experiment id, artifact root relative to the proxy).
    runs: BTreeMap<String, (String, String, String)>,
    /// Runs an artifact of which was refused: a model is not registered from them.
    #[serde(default)]
    incomplete: std::collections::BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("MLflow at {url}: {reason}")]
    Server { url: String, reason: String },
    /// The server refused this one request for what it holds (a 400, 404, 413 or 422): sending
    /// it again cannot succeed, so delivery notes it and goes on with the next record.
    #[error("MLflow at {url} refused a record: {reason}")]
    Rejected { url: String, reason: String },
    #[error("tracking spool {path}: {source}")]
    Spool {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// `url` with a `user:password@` before its host taken out (reqwest sends them as basic
/// authentication; messages and `sync`'s report must not print them).
fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// `path` with each `/`-separated segment percent-encoded: a file named `notes#1.md` or
/// `a?b` would otherwise end the URL's path at its `#` or `?`.
fn url_path(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            segment
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// `key` as MLflow accepts it: at most 250 characters of letters, digits and `_-. :/`, the
/// rest replaced by `_`. Pipeline params are free-form YAML keys (`batch(size)`), and one
/// refused key would lose the whole batch it came in.
fn mlflow_key(key: &str) -> String {
    // Cut first: a cut after the clean-up below could end in `/.` again.
    let clean: String = key
        .chars()
        .take(250)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-. :/".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    // MLflow also refuses a name that changes when read as a path (`val/`, `a//b`, `./x`),
    // or that starts with `..` (`..x`): the whole batch would go with it. Its parts are
    // kept, `.` and `..` spelled out.
    let parts: Vec<String> = clean
        .split('/')
        .filter(|p| !p.is_empty())
        .enumerate()
        .map(|(i, p)| match p {
            "." => "_".to_string(),
            ".." => "__".to_string(),
            p if i == 0 && p.starts_with("..") => format!("__{}", &p[2..]),
            p => p.to_string(),
        })
        .collect();
    if parts.is_empty() {
        "_".to_string()
    } else {
        parts.join("/")
    }
}

/// [`mlflow_key`] of each key, made unique: `batch(size)` and `batch_size_` clean to one
/// key, and MLflow refuses a batch that gives one param two values. A later key that
/// collides gets `_2`, `_3`, ... (in the keys' order, so the same on every delivery).
fn mlflow_keys<'k>(keys: impl Iterator<Item = &'k String>) -> Vec<String> {
    let mut taken = std::collections::HashSet::new();
    keys.map(|k| {
        let clean = mlflow_key(k);
        let mut key = clean.clone();
        let mut n = 1;
        while !taken.insert(key.clone()) {
            n += 1;
            let suffix = format!("_{n}");
            let stem: String = clean.chars().take(250 - suffix.len()).collect();
            key = format!("{stem}{suffix}");
        }
        key
    })
    .collect()
}

/// A small MLflow REST client: the calls run tracking needs, nothing else.
#[derive(Clone)]
pub struct MlflowClient {
    base: String,
    /// `base` without a `user:password@` it may hold: what messages show.
    shown: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for MlflowClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        write!(f, "MlflowClient({})", self.shown)
    }
}

impl MlflowClient {
    /// Reads credentials from `MLFLOW_TRACKING_TOKEN`, or `MLFLOW_TRACKING_USERNAME` and
    /// `MLFLOW_TRACKING_PASSWORD`, as MLflow's own clients do.
    pub fn new(url: &str) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        // Empty is unset, as MLflow's own clients read them (a template's `TOKEN=""`).
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(token) = var("MLFLOW_TRACKING_TOKEN") {
            if let Ok(mut v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")) {
                v.set_sensitive(true);
                headers.insert(reqwest::header::AUTHORIZATION, v);
            }
        } else if let (Some(user), Some(pass)) = (
            var("MLFLOW_TRACKING_USERNAME"),
            var("MLFLOW_TRACKING_PASSWORD"),
        ) {
            use base64_lite::encode;
            if let Ok(mut v) = reqwest::header::HeaderValue::from_str(&format!(
                "Basic {}",
                encode(&format!("{user}:{pass}"))
            )) {
                v.set_sensitive(true);
                headers.insert(reqwest::header::AUTHORIZATION, v);
            }
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            // A redirect is a login page (an SSO proxy whose session ran out), never MLflow:
            // followed, its 200 would count records delivered that were not.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .build()
            .expect("a TLS backend is compiled in");
        let base = url.trim_end_matches('/').to_string();
        MlflowClient {
            shown: without_credentials(&base),
            base,
            http,
        }
    }

    /// The server's URL as shown: without the credentials it may hold.
    pub fn url(&self) -> &str {
        &self.shown
    }

    fn err(&self, reason: impl Into<String>) -> TrackError {
        TrackError::Server {
            url: self.shown.clone(),
            reason: reason.into(),
        }
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<Value, (Option<String>, TrackError)> {
        let resp = req
            .send()
            .await
            .map_err(|e| (None, self.err(e.to_string())))?;
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap_or_default();
        let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
        let body = parsed.clone().unwrap_or(Value::Null);
        if status.is_success() && (parsed.is_some() || bytes.is_empty()) {
            Ok(body)
        } else if status.is_success() {
            // MLflow answers with JSON, or nothing: anything else is a proxy's page (a login
            // form), and the record did not arrive.
            Err((
                None,
                self.err(format!("{status} with a body that is not MLflow's JSON")),
            ))
        } else {
            let code = body["error_code"].as_str().map(str::to_string);
            let msg = body["message"].as_str().unwrap_or("").to_string();
            let reason = format!("{status}: {msg}");
            // Authentication (401, 403), throttling (429) and server errors may pass later;
            // these say the record itself is wrong, but only when MLflow itself says so (its
            // JSON names an error code): a proxy's page, or a URL missing its path prefix,
            // answers 404 to every record, and passing over them all would lose the spool.
            // A 413 is the record's size whoever says it (a proxy's body limit, often); an
            // unknown endpoint is a wrong URL, not a wrong record.
            let mlflow_refused = code.as_deref().is_some_and(|c| c != "ENDPOINT_NOT_FOUND")
                && matches!(status.as_u16(), 400 | 404 | 422);
            let e = if mlflow_refused || status.as_u16() == 413 {
                TrackError::Rejected {
                    url: self.shown.clone(),
                    reason,
                }
            } else {
                self.err(reason)
            };
            Err((code, e))
        }
    }

    async fn post(&self, api: &str, body: Value) -> Result<Value, (Option<String>, TrackError)> {
        self.send(
            self.http
                .post(format!("{}/api/2.0/mlflow/{api}", self.base))
                .json(&body),
        )
        .await
    }

    pub async fn get(&self, api: &str, query: &[(&str, &str)]) -> Result<Value, TrackError> {
        self.send(
            self.http
                .get(format!("{}/api/2.0/mlflow/{api}", self.base))
                .query(query),
        )
        .await
        .map_err(|(_, e)| e)
    }

    /// The experiment's id, created when missing.
    pub async fn experiment_id(&self, name: &str) -> Result<String, TrackError> {
        for _ in 0..2 {
            match self
                .get("experiments/get-by-name", &[("experiment_name", name)])
                .await
            {
                Ok(v) => {
                    // Deleted in the UI (MLflow keeps it, and refuses runs in it): the
                    // records wait in the spool, as for a server that is down, rather than
                    // be passed over as refused.
                    if v["experiment"]["lifecycle_stage"] == "deleted" {
                        return Err(self.err(format!(
                            "experiment `{name}` is deleted; restore it (`mlflow experiments restore`) or delete it for good, then `orchestrate sync`"
                        )));
                    }
                    if let Some(id) = v["experiment"]["experiment_id"].as_str() {
                        return Ok(id.to_string());
                    }
                }
                Err(TrackError::Rejected { reason, .. }) if reason.starts_with("404") => {}
                Err(e) => return Err(e),
            }
            match self
                .post("experiments/create", json!({ "name": name }))
                .await
            {
                Ok(v) => {
                    if let Some(id) = v["experiment_id"].as_str() {
                        return Ok(id.to_string());
                    }
                }
                // Created by someone else meanwhile: look it up again.
                Err((Some(code), _)) if code == "RESOURCE_ALREADY_EXISTS" => {}
                Err((_, e)) => return Err(e),
            }
        }
        Err(self.err(format!("cannot create or find experiment `{name}`")))
    }

    async fn find_run(
        &self,
        experiment: &str,
        uid: &str,
    ) -> Result<Option<(String, String)>, TrackError> {
        let filter = format!("tags.`orchestrate.uid` = '{uid}'");
        let v = self
            .post(
                "runs/search",
                json!({ "experiment_ids": [experiment], "filter": filter, "max_results": 1 }),
            )
            .await
            .map_err(|(_, e)| e)?;
        Ok(v["runs"][0]["info"]["run_id"].as_str().map(|id| {
            let root = v["runs"][0]["info"]["artifact_uri"]
                .as_str()
                .unwrap_or("")
                .to_string();
            (id.to_string(), root)
        }))
    }

    async fn create_run(
        &self,
        experiment: &str,
        name: &str,
        start_ms: i64,
        tags: &BTreeMap<String, String>,
    ) -> Result<(String, String), TrackError> {
        let tags: Vec<Value> = tags
            .iter()
            .map(|(k, v)| json!({"key": mlflow_key(k), "value": v}))
            .collect();
        let v = self
            .post(
                "runs/create",
                json!({"experiment_id": experiment, "run_name": name, "start_time": start_ms, "tags": tags}),
            )
            .await
            .map_err(|(_, e)| e)?;
        let id = v["run"]["info"]["run_id"]
            .as_str()
            .ok_or_else(|| self.err("runs/create answered without a run id"))?;
        let root = v["run"]["info"]["artifact_uri"]
            .as_str()
            .unwrap_or("")
            .to_string();
        Ok((id.to_string(), root))
    }

    async fn log_batch(
        &self,
        run_id: &str,
        metrics: &[Metric],
        params: &BTreeMap<String, String>,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), TrackError> {
        let kv = |m: &BTreeMap<String, String>| -> Vec<Value> {
            mlflow_keys(m.keys())
                .into_iter()
                .zip(m.values())
                .map(|(k, v)| json!({"key": k, "value": v}))
                .collect()
        };
        let params = kv(params);
        let tags = kv(tags);
        let metrics: Vec<Metric> = metrics
            .iter()
            .map(|m| Metric {
                key: mlflow_key(&m.key),
                ..m.clone()
            })
            .collect();
        let mut calls: Vec<Value> = Vec::new();
        calls.extend(
            params
                .chunks(MAX_PARAMS)
                .map(|c| json!({"run_id": run_id, "params": c})),
        );
        calls.extend(
            tags.chunks(MAX_TAGS)
                .map(|c| json!({"run_id": run_id, "tags": c})),
        );
        calls.extend(
            metrics
                .chunks(MAX_METRICS)
                .map(|c| json!({"run_id": run_id, "metrics": c})),
        );
        // A part the server refuses does not take the others down with it: they are still
        // sent, and the first refusal is what the record reports. Any other failure (the
        // server unreachable) stops here, and the record is sent again later.
        let mut refused = None;
        for call in calls {
            match self.post("runs/log-batch", call).await {
                Ok(_) => {}
                Err((_, e @ TrackError::Rejected { .. })) => {
                    refused.get_or_insert(e);
                }
                Err((_, e)) => return Err(e),
            }
        }
        refused.map_or(Ok(()), Err)
    }

    async fn update_run(&self, run_id: &str, status: &str, end_ms: i64) -> Result<(), TrackError> {
        self.post(
            "runs/update",
            json!({"run_id": run_id, "status": status, "end_time": end_ms}),
        )
        .await
        .map(|_| ())
        .map_err(|(_, e)| e)
    }

    /// A version of `name` from the run's artifacts at `source`, created once per run.
    async fn register(&self, name: &str, source: &str, run_id: &str) -> Result<(), TrackError> {
        match self
            .post("registered-models/create", json!({ "name": name }))
            .await
        {
            Ok(_) => {}
            Err((Some(code), _)) if code == "RESOURCE_ALREADY_EXISTS" => {}
            Err((_, e)) => return Err(e),
        }
        let filter = format!("name = '{name}' and run_id = '{run_id}'");
        let found = self
            .get("model-versions/search", &[("filter", filter.as_str())])
            .await?;
        if found["model_versions"]
            .as_array()
            .is_some_and(|v| !v.is_empty())
        {
            return Ok(());
        }
        self.post(
            "model-versions/create",
            json!({ "name": name, "source": source, "run_id": run_id }),
        )
        .await
        .map(|_| ())
        .map_err(|(_, e)| e)
    }

    /// Uploads through the server's artifact proxy (`mlflow-artifacts:` artifact roots).
    /// `body` is the file's bytes, or for a large file the file itself, streamed as it is
    /// read, its length sent ahead (see [`upload_body`]).
    async fn upload(
        &self,
        artifact_root: &str,
        path: &str,
        body: reqwest::Body,
        len: u64,
    ) -> Result<(), TrackError> {
        let Some(rel) = artifact_root.strip_prefix("mlflow-artifacts:/") else {
            // The run's root does not change: retrying would hold back every later record.
            return Err(TrackError::Rejected {
                url: self.shown.clone(),
                reason: format!(
                    "the run's artifact root `{artifact_root}` is not served through MLflow's artifact proxy; start the server with --artifacts-destination"
                ),
            });
        };
        // `mlflow-artifacts://host:port/1/...` names the proxy's host too: its path alone
        // is where the proxy keeps the run's files.
        let rel = match rel.strip_prefix('/') {
            Some(with_host) => with_host.split_once('/').map_or("", |(_, path)| path),
            None => rel,
        };
        let url = format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{}/{}",
            self.base,
            rel.trim_matches('/'),
            url_path(path)
        );
        // The client's 30 s are for records; a file takes as long as its bytes need, at a
        // floor of 1 MB/s (a 2 GB model: 35 minutes), or it would time out on every retry.
        let timeout = Duration::from_secs(30 + len / 1_000_000);
        let req = self
            .http
            .put(url)
            .timeout(timeout)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body);
        self.send(req).await.map(|_| ()).map_err(|(_, e)| e)
    }
}

/// Files up to this size go up to MLflow from memory, larger ones streamed from the file.
const UPLOAD_FROM_MEMORY: u64 = 64 << 20;

/// An upload's body and length. A file up to [`UPLOAD_FROM_MEMORY`] is read whole: a body in
/// memory can be sent again where a proxy redirects the request (307, 308), which a stream
/// cannot. A larger one (a model) is streamed, so no file needs to fit in memory.
async fn upload_body(file: &Path) -> std::io::Result<(reqwest::Body, u64)> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(file).await?;
    let len = f.metadata().await?.len();
    if len <= UPLOAD_FROM_MEMORY {
        let mut bytes = Vec::with_capacity(len as usize);
        f.read_to_end(&mut bytes).await?;
        let len = bytes.len() as u64;
        return Ok((reqwest::Body::from(bytes), len));
    }
    Ok((reqwest::Body::from(f), len))
}

/// Base64 for a basic-auth header, without another dependency for twenty lines.
mod base64_lite {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
        for chunk in b.chunks(3) {
            let n = (chunk[0] as u32) << 16
                | (*chunk.get(1).unwrap_or(&0) as u32) << 8
                | *chunk.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn known_values() {
        assert_eq!(encode("user:pass"), "dXNlcjpwYXNz");
        assert_eq!(encode("ab"), "YWI=");
    }
}

/// Appends records to one run's spool file.
struct SpoolWriter {
    path: PathBuf,
    files: PathBuf,
    next: u64,
}

impl SpoolWriter {
    fn append(&mut self, op: Op) -> Result<(), TrackError> {
        let entry = Entry { seq: self.next, op };
        let mut line = serde_json::to_vec(&entry).expect("plain JSON");
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| spool_err(&self.path, e))?;
        let before = f.metadata().map(|m| m.len());
        if let Err(e) = f.write_all(&line) {
            // Part of a line (a full disk) would glue the next record onto it: cut it off.
            if let Ok(len) = before {
                let _ = f.set_len(len);
            }
            return Err(spool_err(&self.path, e));
        }
        self.next += 1;
        Ok(())
    }
}

/// Whether a flattened param (`deploy.with.env.API_TOKEN`) names a secret by its last part:
/// MLflow shows params to everyone who can read the experiment, so such values go as `***`.
/// (An environment variable's name, too: `orchestrate export` keeps those out of workflows.)
pub(crate) fn names_a_secret(param: &str) -> bool {
    let last = param.rsplit('.').next().unwrap_or(param);
    // Words of `snake_case`, `kebab-case` and `camelCase` alike: `dbPassword` → db, password.
    // An acronym ends where a capital is followed by a small letter: `HFToken` → hf, token.
    let chars: Vec<char> = last.chars().collect();
    let mut split = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let prev = i.checked_sub(1).map(|j| chars[j]);
        let next = chars.get(i + 1);
        let starts_word = c.is_ascii_uppercase()
            && prev.is_some_and(|p| {
                p.is_ascii_lowercase()
                    || p.is_ascii_digit()
                    || (p.is_ascii_uppercase() && next.is_some_and(|n| n.is_ascii_lowercase()))
            });
        if starts_word {
            split.push('_');
        }
        split.push(c.to_ascii_lowercase());
    }
    let words: Vec<&str> = split.split(['_', '-']).collect();
    // Where a secret is, not the secret: `api_key_env` names a variable, `HF_TOKEN_PATH` a
    // file, and their values read in clear (hiding them hid `$ORCHESTRATE_API_KEY` in every
    // command that names it).
    if words
        .last()
        .is_some_and(|w| ["env", "file", "path", "dir", "name"].contains(w))
    {
        return false;
    }
    let alone = [
        "secret",
        "token",
        "password",
        "passwd",
        "credential",
        "credentials",
        "apikey",
    ];
    words.iter().any(|w| alone.contains(w))
        || words
            .windows(2)
            .any(|p| p[1] == "key" && ["api", "access", "private"].contains(&p[0]))
}

/// Values that go to MLflow as `***` wherever they appear, not only under their own name:
/// `${env.HF_TOKEN}` interpolated into a shell stage's `run` would otherwise be logged in
/// clear as the param `fetch.run`. Gathered from the environment variables and the params
/// whose names [`names_a_secret`]. Shorter values are left alone: hiding every `1` or `abc`
/// would hide more than secrets, and a secret that short protects nothing anyway.
#[derive(Debug, Default, Clone)]
pub(crate) struct Secrets(Vec<String>);

/// The fewest characters a value must have to be hidden elsewhere than under its own name.
const MIN_SECRET_CHARS: usize = 6;

impl Secrets {
    /// The values of this process's environment variables that name a secret.
    pub(crate) fn from_env() -> Self {
        let mut s = Secrets::default();
        for (name, value) in std::env::vars_os() {
            if let (Some(name), Some(value)) = (name.to_str(), value.to_str()) {
                if names_a_secret(name) {
                    s.add(value);
                }
            }
        }
        s
    }

    pub(crate) fn add(&mut self, value: &str) {
        if value.chars().count() >= MIN_SECRET_CHARS && !self.0.iter().any(|v| v == value) {
            self.0.push(value.to_string());
            // The longest first, so that a secret holding another is hidden whole.
            self.0.sort_by_key(|v| std::cmp::Reverse(v.len()));
        }
    }

    /// `text` with every secret replaced by `***`.
    pub(crate) fn hide(&self, text: &str) -> String {
        let mut out = text.to_string();
        for v in &self.0 {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), "***");
            }
        }
        out
    }
}

/// The pipeline whose run a spool records: its first record starts the run, tagged with
/// the pipeline's name. None where that cannot be read.
fn spool_pipeline(spool: &Path) -> Option<String> {
    use std::io::BufRead;
    let mut first = String::new();
    std::io::BufReader::new(std::fs::File::open(spool).ok()?)
        .read_line(&mut first)
        .ok()?;
    match serde_json::from_str::<Entry>(&first).ok()?.op {
        Op::StartRun { tags, .. } => tags.get("orchestrate.pipeline").cloned(),
        _ => None,
    }
}

/// A spool file's bytes from `offset` on (none where the file is shorter: a spool written
/// again from the start, which a new run id never does, reads from its start).
/// Returns where it read from, too.
fn read_from(spool: &Path, offset: u64) -> std::io::Result<(u64, Vec<u8>)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(spool)?;
    let len = f.metadata()?.len();
    let start = if offset <= len { offset } else { 0 };
    f.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok((start, bytes))
}

/// A spool's text. A line torn inside a character (the process killed mid-append) would
/// make the whole file unreadable as UTF-8; read leniently, it is one more torn line, which
/// no record parses from, and the others are delivered.
fn read_spool(spool: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(spool)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Whether a run holds the spool lock at `path` (it does for as long as it lives); false
/// where there is no such file.
pub fn lock_is_held(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    // Taken for an instant and let go (when `file` closes) where nobody holds it.
    matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

fn open_lock(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Ends, as `KILLED`, every run a spool started and never ended: its process is gone (a
/// second Ctrl-C, SIGKILL, a crash), and MLflow would otherwise show it running for good.
/// Returns how many were closed.
fn close_abandoned(spool: &Path) -> Result<usize, TrackError> {
    let text = match read_spool(spool) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(spool_err(spool, e)),
    };
    let mut open: Vec<String> = Vec::new();
    let mut last = 0;
    for entry in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Entry>(l).ok())
    {
        last = last.max(entry.seq);
        match entry.op {
            Op::StartRun { uid, .. } => open.push(uid),
            Op::EndRun { uid, .. } => open.retain(|u| *u != uid),
            _ => {}
        }
    }
    if open.is_empty() {
        return Ok(0);
    }
    // Children before their parent, as a live run ends them.
    open.reverse();
    let mut lines = Vec::new();
    if !text.is_empty() && !text.ends_with('\n') {
        lines.push(b'\n'); // after a torn last line, which delivery skips
    }
    // Ended when the spool was last written to (its last record), not now: a run killed on
    // Friday and synced on Monday did not run all weekend.
    let ended_ms = std::fs::metadata(spool)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or_else(now_ms, |d| d.as_millis() as i64);
    for (i, uid) in open.iter().enumerate() {
        let entry = Entry {
            seq: last + 1 + i as u64,
            op: Op::EndRun {
                uid: uid.clone(),
                status: "KILLED".into(),
                end_ms: ended_ms,
            },
        };
        lines.extend(serde_json::to_vec(&entry).expect("plain JSON"));
        lines.push(b'\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(spool)
        .map_err(|e| spool_err(spool, e))?;
    f.write_all(&lines).map_err(|e| spool_err(spool, e))?;
    Ok(open.len())
}

/// Removes a delivered spool: its records, its delivery state, its copies of artifacts, and
/// with `lock`, its lock file (whose lock the caller holds, so no `sync` starts on it
/// meanwhile; one that opens the path afterwards finds nothing to deliver). A run keeps its
/// own lock file: it holds the lock for as long as it lives (a run that goes on serving),
/// which tells `gc` the run is going on; `gc` removes it once free. Best effort: what is
/// left is delivered again as nothing, its state saying so.
fn remove_spool(spool: &Path, lock: bool) {
    let Some(id) = spool.file_stem() else { return };
    if let Some(dir) = spool.parent() {
        let _ = std::fs::remove_dir_all(dir.join("files").join(id));
    }
    let _ = std::fs::remove_file(spool);
    let _ = std::fs::remove_file(spool.with_extension("state.json"));
    if lock {
        let _ = std::fs::remove_file(spool.with_extension("lock"));
    }
}

fn spool_err(path: &Path, source: std::io::Error) -> TrackError {
    TrackError::Spool {
        path: path.display().to_string(),
        source,
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The tracker of one orchestrate run.
pub struct Tracker {
    spool: Mutex<SpoolWriter>,
    state_path: PathBuf,
    /// Metrics wait here briefly so that a training loop's steps become one record, not many.
    buffered: Mutex<BTreeMap<String, Vec<Metric>>>,
    client: Option<MlflowClient>,
    wake: tokio::sync::Notify,
    /// The first problem that stays (a record refused, a file not copied), reported once.
    problem: Mutex<Option<String>>,
    /// Why the server could not be reached, until a delivery reaches it again: a server
    /// that was down for a while and then took every record leaves the run with nothing
    /// to report, and its spool removed.
    unreachable: Mutex<Option<String>>,
    /// Values hidden wherever they appear in params and tags: the environment's secrets, and
    /// each param's whose name is a secret's as it is logged (the pipeline's first).
    secrets: Mutex<Secrets>,
    /// An exclusive lock on the spool's `.lock` file for as long as the run lives; the
    /// system drops it when the process ends, however it ends. `sync` passes over a spool
    /// whose lock is held (its run delivers it) and closes the runs of one whose is not.
    _alive: Option<std::fs::File>,
}

/// What reached the server.
#[derive(Debug, Default, Serialize)]
pub struct Delivery {
    pub records: u64,
    pub delivered: u64,
    pub problem: Option<String>,
}

impl Tracker {
    pub fn new(
        spool_dir: &Path,
        run_id: &str,
        client: Option<MlflowClient>,
    ) -> Result<Arc<Tracker>, TrackError> {
        let files = spool_dir.join("files").join(run_id);
        std::fs::create_dir_all(&files).map_err(|e| spool_err(&files, e))?;
        let lock_path = spool_dir.join(format!("{run_id}.lock"));
        let alive = open_lock(&lock_path).map_err(|e| spool_err(&lock_path, e))?;
        // A new run id: nobody else can hold it, except a `sync` in the very same instant,
        // which finds nothing to deliver yet and lets go.
        alive.lock().map_err(|e| spool_err(&lock_path, e))?;
        Ok(Arc::new(Tracker {
            spool: Mutex::new(SpoolWriter {
                path: spool_dir.join(format!("{run_id}.jsonl")),
                files,
                next: 1,
            }),
            state_path: spool_dir.join(format!("{run_id}.state.json")),
            buffered: Mutex::new(BTreeMap::new()),
            client,
            wake: tokio::sync::Notify::new(),
            problem: Mutex::new(None),
            unreachable: Mutex::new(None),
            secrets: Mutex::new(Secrets::from_env()),
            _alive: Some(alive),
        }))
    }

    fn record(&self, op: Op) {
        let result = self
            .spool
            .lock()
            .map_err(|_| ())
            .and_then(|mut s| s.append(op).map_err(|_| ()));
        if result.is_err() {
            self.note_problem("cannot write the tracking spool".into());
        }
        self.wake.notify_one();
    }

    fn note_problem(&self, p: String) {
        if let Ok(mut slot) = self.problem.lock() {
            slot.get_or_insert(p);
        }
    }

    pub fn start_run(
        &self,
        uid: &str,
        parent: Option<&str>,
        experiment: &str,
        name: &str,
        tags: BTreeMap<String, String>,
    ) {
        self.record(Op::StartRun {
            uid: uid.into(),
            parent: parent.map(str::to_string),
            experiment: experiment.into(),
            name: name.into(),
            start_ms: now_ms(),
            tags,
        });
    }

    /// `text` with every secret known so far as `***` (see [`Secrets`]).
    pub fn hide_secrets(&self, text: &str) -> String {
        match self.secrets.lock() {
            Ok(known) => known.hide(text),
            Err(_) => Secrets::from_env().hide(text),
        }
    }

    pub fn log(&self, uid: &str, params: BTreeMap<String, String>, tags: BTreeMap<String, String>) {
        let secrets = match self.secrets.lock() {
            Ok(mut known) => {
                for (k, v) in &params {
                    if names_a_secret(k) {
                        known.add(v);
                    }
                }
                known.clone()
            }
            Err(_) => Secrets::from_env(),
        };
        let tags = tags
            .into_iter()
            .map(|(k, v)| (k, secrets.hide(&v).chars().take(MAX_TAG_CHARS).collect()))
            .collect();
        let params = params
            .into_iter()
            .map(|(k, v)| {
                let v = if names_a_secret(&k) {
                    "***".to_string()
                } else {
                    secrets.hide(&v)
                };
                let v = if v.chars().count() > MAX_PARAM_CHARS {
                    v.chars()
                        .take(MAX_PARAM_CHARS - 1)
                        .chain(std::iter::once('…'))
                        .collect()
                } else {
                    v
                };
                (k, v)
            })
            .collect();
        self.record(Op::Log {
            uid: uid.into(),
            metrics: Vec::new(),
            params,
            tags,
        });
    }

    pub fn metric(&self, uid: &str, key: &str, value: f64, step: i64) {
        if let Ok(mut b) = self.buffered.lock() {
            b.entry(uid.to_string()).or_default().push(Metric {
                key: key.to_string(),
                value,
                timestamp: now_ms(),
                step,
            });
        }
    }

    /// Moves buffered metrics into the spool.
    pub fn flush_metrics(&self) {
        let drained: BTreeMap<String, Vec<Metric>> = match self.buffered.lock() {
            Ok(mut b) => std::mem::take(&mut *b),
            Err(_) => return,
        };
        for (uid, metrics) in drained {
            for chunk in metrics.chunks(MAX_METRICS) {
                self.record(Op::Log {
                    uid: uid.clone(),
                    metrics: chunk.to_vec(),
                    params: BTreeMap::new(),
                    tags: BTreeMap::new(),
                });
            }
        }
    }

    /// Copies `file` into the spool and records it for upload as `path`; whether it did
    /// (the problem is noted where not).
    pub fn artifact(&self, uid: &str, file: &Path, path: &str) -> bool {
        // Copied and recorded under one hold of the spool: the copy is named by the record's
        // sequence number, which another stage finishing meanwhile would take too.
        let recorded = match self.spool.lock() {
            Ok(mut s) => {
                let name = format!("{}-{}", s.next, path.replace('/', "_"));
                let dest = s.files.join(&name);
                // Recorded relative to the spool's folder: a spool moved or mounted
                // elsewhere (`sync --spool DIR`) still finds its copies.
                let run_dir = s
                    .files
                    .file_name()
                    .map(|d| d.to_string_lossy().into_owned());
                let recorded_as = match run_dir {
                    Some(run) => format!("files/{run}/{name}"),
                    None => dest.display().to_string(),
                };
                match std::fs::copy(file, &dest) {
                    Ok(_) => s
                        .append(Op::Artifact {
                            uid: uid.into(),
                            file: recorded_as,
                            path: path.into(),
                        })
                        .map_err(|_| "cannot write the tracking spool".to_string()),
                    Err(_) => Err(format!(
                        "cannot copy {} into the tracking spool",
                        file.display()
                    )),
                }
            }
            Err(_) => Err("cannot write the tracking spool".to_string()),
        };
        match recorded {
            Ok(()) => {
                self.wake.notify_one();
                true
            }
            Err(problem) => {
                self.note_problem(problem);
                false
            }
        }
    }

    /// Records a new version of registered model `name` from the run's artifacts at `path`.
    pub fn register_model(&self, uid: &str, name: &str, path: &str) {
        self.record(Op::RegisterModel {
            uid: uid.into(),
            name: name.into(),
            path: path.into(),
        });
    }

    pub fn end_run(&self, uid: &str, status: &str) {
        self.flush_metrics();
        self.record(Op::EndRun {
            uid: uid.into(),
            status: status.into(),
            end_ms: now_ms(),
        });
    }

    /// Delivers in the background until `stop` fires, then once more.
    pub fn spawn_delivery(
        self: &Arc<Self>,
        stop: Arc<tokio::sync::Notify>,
    ) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut backoff = Duration::ZERO;
            loop {
                tokio::select! {
                    _ = stop.notified() => break,
                    _ = tokio::time::sleep(METRIC_FLUSH.max(backoff)) => {}
                    _ = me.wake.notified(), if backoff.is_zero() => {}
                }
                me.flush_metrics();
                if me.client.is_some() {
                    backoff = match me.deliver().await {
                        Ok(_) => Duration::ZERO,
                        // A server that is down is retried every few seconds, not hammered.
                        Err(_) => Duration::from_secs(5),
                    };
                }
            }
        })
    }

    /// Flushes and makes a last delivery attempt.
    pub async fn finish(&self) -> Delivery {
        self.flush_metrics();
        let records = self.spool.lock().map(|s| s.next - 1).unwrap_or(0);
        let mut d = Delivery {
            records,
            ..Default::default()
        };
        if self.client.is_some() {
            if let Ok(n) = self.deliver().await {
                d.delivered = n;
            }
        }
        d.problem = self
            .problem
            .lock()
            .ok()
            .and_then(|p| p.clone())
            .or_else(|| self.unreachable.lock().ok().and_then(|p| p.clone()));
        // Delivered to its end with nothing refused: the spool has served (a registered
        // model's copy in it is as large as the model). Kept otherwise, for `sync` or for
        // reading what was refused; and without a server, as the run's history.
        if self.client.is_some() && d.problem.is_none() && d.delivered == d.records {
            if let Ok(s) = self.spool.lock() {
                remove_spool(&s.path, false);
            }
        }
        d
    }

    async fn deliver(&self) -> Result<u64, TrackError> {
        let path = self
            .spool
            .lock()
            .map(|s| s.path.clone())
            .map_err(|_| spool_err(Path::new("spool"), std::io::Error::other("poisoned")))?;
        let client = self.client.as_ref().expect("checked by the caller");
        let reached = |why: Option<String>| {
            if let Ok(mut slot) = self.unreachable.lock() {
                *slot = why;
            }
        };
        match deliver_file(client, &path, &self.state_path).await {
            Ok(d) => {
                reached(None);
                for r in d.rejected {
                    self.note_problem(r);
                }
                Ok(d.total)
            }
            Err(e) => {
                // A spool that cannot be read or written is a problem that stays.
                match e {
                    TrackError::Spool { .. } => self.note_problem(e.to_string()),
                    _ => reached(Some(e.to_string())),
                }
                Err(e)
            }
        }
    }
}

/// What one delivery of a spool file did.
#[derive(Debug, Default)]
pub struct Delivered {
    /// Records delivered (or refused) in all, this time and before.
    pub total: u64,
    /// The records the server refused this time, each described: they are passed over so
    /// that the records after them, and other runs' spools, still arrive.
    pub rejected: Vec<String>,
    /// How many it refused, this time and before.
    pub refused: u64,
}

/// Delivers a spool file from where its state says delivery stopped.
pub async fn deliver_file(
    client: &MlflowClient,
    spool: &Path,
    state_path: &Path,
) -> Result<Delivered, TrackError> {
    let mut state: DeliveryState = std::fs::read(state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let (start, bytes) = match read_from(spool, state.offset) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Delivered {
                total: state.delivered,
                rejected: Vec::new(),
                refused: state.refused,
            })
        }
        Err(e) => return Err(spool_err(spool, e)),
    };
    let mut rejected = Vec::new();
    let mut at = start;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        // A line not ended yet is being written: read again next time, from its start.
        if line.last() != Some(&b'\n') {
            break;
        }
        at += line.len() as u64;
        // A line torn by a kill (or inside a character) parses as no record and is passed
        // over, as one already delivered is.
        let entry = match serde_json::from_slice::<Entry>(line) {
            Ok(entry) if entry.seq > state.delivered => entry,
            _ => {
                state.offset = at;
                continue;
            }
        };
        match apply(client, &mut state, &entry.op, spool).await {
            Ok(()) => {}
            Err(TrackError::Rejected { reason, .. }) => {
                state.refused += 1;
                rejected.push(format!(
                    "{}, record {}: {} refused ({reason}); passed over",
                    spool.display(),
                    entry.seq,
                    entry.op.name()
                ))
            }
            Err(e) => return Err(e),
        }
        state.delivered = entry.seq;
        state.offset = at;
        crate::write_whole(state_path, &serde_json::to_vec(&state).expect("plain JSON"))
            .map_err(|e| spool_err(state_path, e))?;
    }
    Ok(Delivered {
        total: state.delivered,
        rejected,
        refused: state.refused,
    })
}

async fn apply(
    client: &MlflowClient,
    state: &mut DeliveryState,
    op: &Op,
    spool: &Path,
) -> Result<(), TrackError> {
    let run = |state: &DeliveryState, uid: &str| {
        state
            .runs
            .get(uid)
            .cloned()
            // Its start was refused (or never spooled): what belongs to it cannot land either.
            .ok_or_else(|| TrackError::Rejected {
                url: client.base.clone(),
                reason: format!("run `{uid}` was never started on the server"),
            })
    };
    match op {
        Op::StartRun {
            uid,
            parent,
            experiment,
            name,
            start_ms,
            tags,
        } => {
            if state.runs.contains_key(uid) {
                return Ok(());
            }
            let exp = match state.experiments.get(experiment) {
                Some(id) => id.clone(),
                None => {
                    let id = client.experiment_id(experiment).await?;
                    state.experiments.insert(experiment.clone(), id.clone());
                    id
                }
            };
            let mut tags = tags.clone();
            tags.insert("orchestrate.uid".into(), uid.clone());
            if let Some(p) = parent {
                let (parent_id, ..) = run(state, p)?;
                tags.insert("mlflow.parentRunId".into(), parent_id);
            }
            // Found again after a delivery that reached the server but not our state file.
            let (id, root) = match client.find_run(&exp, uid).await? {
                Some(found) => found,
                None => client.create_run(&exp, name, *start_ms, &tags).await?,
            };
            state.runs.insert(uid.clone(), (id, exp, root));
        }
        Op::Log {
            uid,
            metrics,
            params,
            tags,
        } => {
            let (id, ..) = run(state, uid)?;
            client.log_batch(&id, metrics, params, tags).await?;
        }
        Op::Artifact { uid, file, path } => {
            let (_, _, root) = run(state, uid)?;
            // Relative to the spool's folder (absolute in spools written before).
            let copy = spool.parent().unwrap_or(Path::new(".")).join(file);
            let uploaded = match upload_body(&copy).await {
                Ok((body, len)) => client.upload(&root, path, body, len).await,
                // Gone from the spool: it will not come back.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(TrackError::Rejected {
                    url: client.base.clone(),
                    reason: format!("its copy {file} is no longer in the spool"),
                }),
                Err(e) => Err(spool_err(&copy, e)),
            };
            if let Err(TrackError::Rejected { .. }) = &uploaded {
                // A model registered from this run would lack the file.
                state.incomplete.insert(uid.clone());
            }
            uploaded?;
        }
        Op::EndRun {
            uid,
            status,
            end_ms,
        } => {
            let (id, ..) = run(state, uid)?;
            client.update_run(&id, status, *end_ms).await?;
        }
        Op::RegisterModel { uid, name, path } => {
            let (id, _, root) = run(state, uid)?;
            if state.incomplete.contains(uid) {
                return Err(TrackError::Rejected {
                    url: client.base.clone(),
                    reason: format!(
                        "a file of the run was refused, so `{name}` is not registered from it without it"
                    ),
                });
            }
            client
                .register(name, &format!("{}/{path}", root.trim_end_matches('/')), &id)
                .await?;
        }
    }
    Ok(())
}

/// What `sync` did over a spool directory.
#[derive(Debug, Default)]
pub struct Synced {
    pub files: usize,
    /// Records delivered now.
    pub sent: u64,
    /// Records the server refused, each described with its file.
    pub rejected: Vec<String>,
    /// Files whose delivery stopped (the server down, say), each with why: the others were
    /// still delivered, and these resume where they stopped next time.
    pub stopped: Vec<(PathBuf, TrackError)>,
    /// Spools of runs still running, passed over: their own process delivers them.
    pub running: usize,
    /// Runs whose process died before ending them, now ended as `KILLED` in their spools.
    pub killed: usize,
    /// Spools not tried: the server stopped an earlier one's delivery.
    pub untried: usize,
    /// Spools of other pipelines' runs, left alone.
    pub other_pipelines: usize,
}

/// Delivers every spool file in `dir`, each as far as it goes.
///
/// With `pipeline`, only the spools of that pipeline's runs: pipelines beside one another
/// share a local cache, and another's records may be for another MLflow server.
pub async fn sync(
    client: &MlflowClient,
    dir: &Path,
    pipeline: Option<&str>,
) -> Result<Synced, TrackError> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(d) => d
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(spool_err(dir, e)),
    };
    files.sort();
    let all = files.len();
    if let Some(name) = pipeline {
        files.retain(|f| spool_pipeline(f).as_deref() == Some(name));
    }
    let other_pipelines = all - files.len();
    let mut out = Synced {
        files: files.len(),
        other_pipelines,
        ..Default::default()
    };
    // Spools in a row whose delivery the server stopped.
    let mut server_stopped = 0;
    for (i, f) in files.iter().enumerate() {
        // One deliverer per spool at a time: its run while it lives, else one `sync`.
        let lock_path = f.with_extension("lock");
        let lock = match open_lock(&lock_path) {
            Ok(l) => l,
            Err(e) => {
                out.stopped.push((f.clone(), spool_err(&lock_path, e)));
                continue;
            }
        };
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                out.running += 1;
                continue;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                out.stopped.push((f.clone(), spool_err(&lock_path, e)));
                continue;
            }
        }
        match close_abandoned(f) {
            Ok(n) => out.killed += n,
            Err(e) => {
                out.stopped.push((f.clone(), e));
                continue;
            }
        }
        let state = f.with_extension("state.json");
        let before: u64 = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<DeliveryState>(&b).ok())
            .map(|s| s.delivered)
            .unwrap_or(0);
        match deliver_file(client, f, &state).await {
            Ok(d) => {
                out.sent += d.total - before;
                if d.refused == 0 {
                    // Delivered to its end, its runs ended: done with, as a run does with
                    // its own (a spool with a refused record stays, to be read).
                    remove_spool(f, true);
                }
                server_stopped = 0;
                out.rejected.extend(d.rejected);
            }
            // The server is down, or refuses us: so it is, most likely, for every spool
            // after these, which would each say so again (forty runs, forty errors). Two in a
            // row, not one: a proxy's 504 for one spool's large upload is that spool's.
            Err(e @ TrackError::Server { .. }) => {
                out.stopped.push((f.clone(), e));
                server_stopped += 1;
                if server_stopped == 2 {
                    out.untried = files.len() - i - 1;
                    break;
                }
            }
            Err(e) => out.stopped.push((f.clone(), e)),
        }
    }
    Ok(out)
}

/// Samples host metrics under MLflow's own system-metric names.
pub struct SystemSampler {
    last_cpu: Option<(u64, u64)>,
    gpus: Option<nvml_wrapper::Nvml>,
}

impl SystemSampler {
    pub fn new() -> Self {
        SystemSampler {
            last_cpu: read_cpu(),
            // No GPU, or no driver library: no GPU metrics, and no error.
            gpus: nvml_wrapper::Nvml::init().ok(),
        }
    }

    pub fn sample(&mut self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        if let (Some((busy0, total0)), Some((busy1, total1))) = (self.last_cpu, read_cpu()) {
            if total1 > total0 {
                out.push((
                    "system/cpu_utilization_percentage".into(),
                    100.0 * (busy1 - busy0) as f64 / (total1 - total0) as f64,
                ));
            }
            self.last_cpu = Some((busy1, total1));
        }
        if let Some((total_kb, available_kb)) = read_meminfo() {
            let used = total_kb.saturating_sub(available_kb) as f64;
            out.push(("system/system_memory_usage_megabytes".into(), used / 1024.0));
            out.push((
                "system/system_memory_usage_percentage".into(),
                100.0 * used / total_kb.max(1) as f64,
            ));
        }
        if let Some(nvml) = &self.gpus {
            let n = nvml.device_count().unwrap_or(0);
            for i in 0..n {
                let Ok(dev) = nvml.device_by_index(i) else {
                    continue;
                };
                if let Ok(u) = dev.utilization_rates() {
                    out.push((
                        format!("system/gpu_{i}_utilization_percentage"),
                        u.gpu as f64,
                    ));
                }
                if let Ok(m) = dev.memory_info() {
                    out.push((
                        format!("system/gpu_{i}_memory_usage_megabytes"),
                        m.used as f64 / 1048576.0,
                    ));
                    out.push((
                        format!("system/gpu_{i}_memory_usage_percentage"),
                        100.0 * m.used as f64 / m.total.max(1) as f64,
                    ));
                }
            }
        }
        out
    }
}

impl Default for SystemSampler {
    fn default() -> Self {
        Self::new()
    }
}

/// (busy, total) jiffies from the first line of /proc/stat.
fn read_cpu() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let nums: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = nums.iter().sum();
    let idle = nums.get(3).copied().unwrap_or(0) + nums.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn read_meminfo() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

pub use crate::key::flatten_params;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_recognised_by_their_names() {
        assert!(names_a_secret("fetch.with.env.AWS_SECRET_ACCESS_KEY"));
        assert!(names_a_secret("fetch.with.env.HF_TOKEN"));
        assert!(names_a_secret("params.db_password"));
        assert!(!names_a_secret("tokenizer.with.vocab_size"));
        assert!(!names_a_secret("model.with.max_len"));
        assert!(!names_a_secret("evaluation.with.max_tokens_per_s"));
        assert!(!names_a_secret("tokenizer.with.author_tokens"));
        assert!(names_a_secret("serve.with.env.OPENAI_API_KEY"));
        assert!(names_a_secret("params.accessToken"));
        assert!(names_a_secret("params.dbPassword"));
        assert!(names_a_secret("params.apiKey"));
        assert!(!names_a_secret("params.maxTokens"));
        assert!(names_a_secret("params.HFToken"));
        assert!(names_a_secret("params.DBPassword"));
        assert!(names_a_secret("params.OpenAIApiKey"));
        assert!(names_a_secret("params.AWSSecretKey"));
        assert!(!names_a_secret("deploy.with.api_key_env"));
        assert!(!names_a_secret("HF_TOKEN_PATH"));
        assert!(!names_a_secret("AWS_WEB_IDENTITY_TOKEN_FILE"));
        assert!(names_a_secret("AWS_ACCESS_KEY_ID"));
    }

    #[test]
    fn cleaned_keys_stay_apart() {
        let keys: Vec<String> = ["batch(size)", "batch_size_", "lr"]
            .iter()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(
            mlflow_keys(keys.iter()),
            vec!["batch_size_", "batch_size__2", "lr"]
        );
        // Cut at 250 where a part `.` begins: still a name MLflow reads unchanged.
        assert_eq!(
            mlflow_key(&format!("{}/./z", "x".repeat(248))),
            "x".repeat(248) + "/_"
        );
        let long = ["x".repeat(300), format!("{}y", "x".repeat(299))];
        let cleaned = mlflow_keys(long.iter());
        assert_eq!(cleaned[1].len(), 250);
        assert!(cleaned[1].ends_with("_2") && cleaned[0] != cleaned[1]);
    }

    #[test]
    fn urls_are_shown_without_credentials_and_paths_encoded() {
        assert_eq!(
            without_credentials("https://me:s3cret@mlflow.example:5000/prefix"),
            "https://mlflow.example:5000/prefix"
        );
        assert_eq!(
            without_credentials("http://127.0.0.1:5000"),
            "http://127.0.0.1:5000"
        );
        let client = MlflowClient::new("https://me:s3cret@mlflow.example");
        assert_eq!(client.url(), "https://mlflow.example");
        assert!(!format!("{client:?}").contains("s3cret"));
        assert_eq!(url_path("model/notes#1.md"), "model/notes%231.md");
        assert_eq!(url_path("a b/c?d"), "a%20b/c%3Fd");
        assert_eq!(
            url_path("model/weights.safetensors"),
            "model/weights.safetensors"
        );
    }

    #[test]
    fn keys_are_names_mlflow_reads_as_paths_unchanged() {
        for (key, want) in [
            ("val/loss", "val/loss"),
            ("val/", "val"),
            ("/loss", "loss"),
            ("a//b", "a/b"),
            ("./x", "_/x"),
            ("a/../b", "a/__/b"),
            ("/", "_"),
            ("train loss(1)", "train loss_1_"),
            ("...", "__."),
            ("..x/y", "__x/y"),
            ("a/..b", "a/..b"),
        ] {
            assert_eq!(mlflow_key(key), want, "{key}");
        }
    }

    #[test]
    fn a_spool_torn_inside_a_character_still_reads() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("r.jsonl");
        let mut bytes = br#"{"seq":1,"op":"x"}"#.to_vec();
        bytes.extend(b"\n{\"seq\":2,\"tag\":\"");
        bytes.extend(&"ж".as_bytes()[..1]);
        std::fs::write(&path, &bytes).unwrap();
        let text = read_spool(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.starts_with(r#"{"seq":1,"op":"x"}"#));
    }

    #[test]
    fn delivery_reads_a_spool_from_where_it_stopped() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("r.jsonl");
        std::fs::write(&path, b"first\nsecond\n").unwrap();
        assert_eq!(read_from(&path, 6).unwrap(), (6, b"second\n".to_vec()));
        assert_eq!(read_from(&path, 13).unwrap(), (13, Vec::new()));
        // Further than the file: it was written anew, read whole, from 0.
        assert_eq!(
            read_from(&path, 99).unwrap(),
            (0, b"first\nsecond\n".to_vec())
        );
    }

    #[test]
    fn params_flatten_with_dots() {
        let mut out = BTreeMap::new();
        flatten_params(
            "model",
            &json!({"lr": 3e-4, "opt": {"beta": 0.9}, "name": "x"}),
            &mut out,
        );
        assert_eq!(out["model.lr"], "0.0003");
        assert_eq!(out["model.opt.beta"], "0.9");
        assert_eq!(out["model.name"], "x");
    }

    /// A 200 that is not MLflow's JSON (a login page) and a redirect to one are failures to
    /// retry, not deliveries.
    #[tokio::test]
    async fn a_login_page_is_not_a_delivery() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for answer in [
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\n\r\n<html></html>",
            "HTTP/1.1 302 Found\r\nLocation: /login\r\nContent-Length: 0\r\n\r\n",
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let server = tokio::spawn(async move {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                conn.write_all(answer.as_bytes()).await.unwrap();
            });
            let client = MlflowClient::new(&url);
            let sent = client.post("runs/update", json!({"run_id": "r"})).await;
            assert!(
                matches!(&sent, Err((_, TrackError::Server { .. }))),
                "{answer}: {:?}",
                sent.map_err(|(_, e)| e.to_string())
            );
            server.await.unwrap();
        }
    }

    /// A file over the in-memory limit goes up streamed, its length sent ahead (no chunked
    /// encoding, which MLflow's artifact proxy may not take), every byte of it.
    #[tokio::test]
    async fn a_large_artifact_is_streamed_whole_with_its_length() {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("weights.bin");
        let len = UPLOAD_FROM_MEMORY + 12_345;
        std::fs::File::create(&file).unwrap().set_len(len).unwrap();
        let (body, sent_len) = upload_body(&file).await.unwrap();
        assert_eq!(sent_len, len);
        assert!(
            body.as_bytes().is_none(),
            "a large file is streamed, not read whole"
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            let mut conn = tokio::io::BufReader::new(conn);
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                conn.read_line(&mut line).await.unwrap();
                if line == "\r\n" {
                    break;
                }
                head.push(line.trim().to_ascii_lowercase());
            }
            let mut got = 0u64;
            let mut buf = vec![0u8; 1 << 16];
            while got < len {
                let n = conn.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            let ok =
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
            conn.get_mut().write_all(ok.as_bytes()).await.unwrap();
            (head, got)
        });
        let client = MlflowClient::new(&url);
        client
            .upload(
                "mlflow-artifacts:/1/r/artifacts",
                "model/weights.bin",
                body,
                sent_len,
            )
            .await
            .unwrap();
        let (head, got) = server.await.unwrap();
        assert_eq!(got, len);
        assert!(head.contains(&format!("content-length: {len}")), "{head:?}");
        assert!(
            !head.iter().any(|h| h.starts_with("transfer-encoding")),
            "{head:?}"
        );
    }

    #[tokio::test]
    async fn spool_records_in_order_without_a_server() {
        let dir = std::env::temp_dir().join(format!("spool-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t = Tracker::new(&dir, "r1", None).unwrap();
        t.start_run("r1", None, "exp", "run", BTreeMap::new());
        t.metric("r1", "loss", 1.5, 0);
        t.metric("r1", "loss", 1.2, 1);
        t.end_run("r1", "FINISHED");
        let d = t.finish().await;
        assert_eq!(d.records, 3);
        let text = std::fs::read_to_string(dir.join("r1.jsonl")).unwrap();
        let ops: Vec<Entry> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(matches!(&ops[1].op, Op::Log { metrics, .. } if metrics.len() == 2));
        assert_eq!(ops.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    /// A secret's value is hidden wherever it appears, once its name has been seen: in a
    /// later stage's `run`, and in a tag (an error message that printed it).
    #[tokio::test]
    async fn secrets_are_hidden_inside_other_values() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::new(dir.path(), "r1", None).unwrap();
        t.start_run("r1", None, "exp", "run", BTreeMap::new());
        let run_params = BTreeMap::from([
            ("params.hf_token".to_string(), "hf_abcdef123".to_string()),
            ("params.short_token".to_string(), "abc".to_string()),
        ]);
        t.log("r1", run_params, BTreeMap::new());
        let params = BTreeMap::from([
            (
                "run".to_string(),
                "login --token hf_abcdef123 abc".to_string(),
            ),
            ("steps".to_string(), "10".to_string()),
        ]);
        let tags = BTreeMap::from([(
            "orchestrate.error".to_string(),
            "401 for hf_abcdef123".to_string(),
        )]);
        t.log("r1", params, tags);
        t.end_run("r1", "FINISHED");
        t.finish().await;
        let text = std::fs::read_to_string(dir.path().join("r1.jsonl")).unwrap();
        assert!(!text.contains("hf_abcdef123"), "{text}");
        let logged: Vec<Entry> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let Op::Log { params, tags, .. } = &logged[2].op else {
            panic!("{text}")
        };
        // Too short to hide elsewhere ("abc"), hidden under its own name.
        assert_eq!(params["run"], "login --token *** abc");
        assert_eq!(params["steps"], "10");
        assert_eq!(tags["orchestrate.error"], "401 for ***");
        let Op::Log { params, .. } = &logged[1].op else {
            panic!("{text}")
        };
        assert_eq!(params["params.short_token"], "***");
    }

    #[test]
    fn system_metrics_use_mlflow_names() {
        let mut s = SystemSampler::new();
        std::thread::sleep(Duration::from_millis(50));
        let names: Vec<String> = s.sample().into_iter().map(|(n, _)| n).collect();
        assert!(
            names.contains(&"system/system_memory_usage_megabytes".to_string()),
            "{names:?}"
        );
    }
}
