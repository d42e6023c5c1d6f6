//! The artifact store: content-addressed blobs and create-only manifests on `object_store`,
//! so the same code serves a local directory and any S3-compatible bucket.
//!
//! Layout under the store root:
//! - `blobs/<2 hex>/<64 hex>`: file contents, named by their blake3 digest.
//! - `manifests/<key>.json`: one per artifact, written last and create-only. Its presence is
//!   the commit: a run killed before it leaves only unreferenced blobs, never a half artifact.
//! - `history/<pipeline>/<stage>/<key>.json`: the key parts of every artifact a stage has
//!   produced, so `plan` can say which part of a key changed.
//! - `runs/<run id>.json`: run records. `locks/<key>.json`: who is producing what.
//!   `pins/<key>`: artifacts that `gc` must keep.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, WriteMultipart};
use orchestrate_stage::ArtifactKind;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::key::{CacheKey, CacheKeyParts};

/// Blobs above this size are uploaded in parts.
const MULTIPART_THRESHOLD: u64 = 32 * 1024 * 1024;
const PART_SIZE: usize = 8 * 1024 * 1024;
/// S3 takes at most 10,000 parts to an upload: 8 MiB parts end at 78 GiB.
const MAX_PARTS: u64 = 9_000;

/// The part size for a blob of `size` bytes: 8 MiB, larger where that would take more than
/// `MAX_PARTS` parts (a file that grows while it is read keeps a margin below S3's limit).
fn part_size(size: u64) -> usize {
    (PART_SIZE as u64).max(size.div_ceil(MAX_PARTS)) as usize
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open artifact store `{url}`: {reason}")]
    Open { url: String, reason: String },
    /// The URL itself names no store (a usage error, not the store's).
    #[error("`{url}` is not an artifact store URL: {reason}")]
    Url { url: String, reason: String },
    #[error("artifact store {op} `{path}`: {source}")]
    Backend {
        op: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("corrupt blob `{path}` (file `{file}` of {what}): expected {expected}, found {actual}; rerun with --repair to rebuild it")]
    Corrupt {
        path: String,
        file: String,
        what: String,
        expected: String,
        actual: String,
    },
    #[error("missing blob `{path}` (file `{file}` of {what}); rerun with --repair to rebuild it")]
    Missing {
        path: String,
        file: String,
        what: String,
    },
    #[error("unreadable {what} `{path}`: {reason}")]
    Decode {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether this says the stored data is damaged (a blob missing or not matching its
    /// digest, a record that does not parse), rather than that the store could not be read.
    pub fn is_damage(&self) -> bool {
        match self {
            StoreError::Corrupt { .. } | StoreError::Decode { .. } | StoreError::Missing { .. } => {
                true
            }
            StoreError::Backend { source, .. } => {
                matches!(source, object_store::Error::NotFound { .. })
            }
            StoreError::Open { .. } | StoreError::Url { .. } | StoreError::Io { .. } => false,
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the artifact root, `/`-separated.
    pub path: String,
    pub digest: String,
    pub size: u64,
    /// Whether the file is executable (a shell stage's built tool or script): given back
    /// so when fetched. Written only when set, so that the manifests, and so the content
    /// digests, of artifacts without one are those written before it was recorded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub executable: bool,
}

impl FileEntry {
    /// What makes an entry read from the store unusable, if anything. A shared store is
    /// written by other machines, and an entry is joined onto a local folder to be fetched:
    /// an absolute path or a `..` in it would write outside the artifact (anyone can give
    /// a manifest a matching digest), and a digest that is not blake3 hex names no blob.
    pub fn problem(&self) -> Option<String> {
        let parts: Vec<&str> = self.path.split('/').collect();
        if self.path.starts_with('/') || parts.iter().any(|p| matches!(*p, "" | "." | "..")) {
            return Some(format!(
                "file path `{}` is not a plain path inside the artifact",
                self.path
            ));
        }
        let hex = self.digest.strip_prefix("blake3:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(format!(
                "file `{}` has no blake3 digest (`{}`)",
                self.path, self.digest
            ));
        }
        None
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Producer {
    pub run_id: String,
    pub host: String,
    pub created_at: String,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: CacheKey,
    pub kind: ArtifactKind,
    pub pipeline: String,
    pub stage: String,
    /// Identifies the content alone (kind and files), so equal outputs have equal digests
    /// whatever produced them: downstream keys use this, not the producer's key.
    pub digest: String,
    pub files: Vec<FileEntry>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub producer: Producer,
    pub key_parts: CacheKeyParts,
}

impl Manifest {
    pub fn content_digest(kind: ArtifactKind, files: &[FileEntry]) -> String {
        let doc = serde_json::json!({"kind": kind, "files": files});
        let bytes = serde_json::to_vec(&doc).expect("plain JSON");
        format!("blake3:{}", blake3::hash(&bytes).to_hex())
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// How many of a stage's newest history entries gc keeps, collected or not.
pub const HISTORY_KEPT: usize = 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub key: CacheKey,
    pub created_at: String,
    pub parts: CacheKeyParts,
}

/// How long the S3 client retries one call (`ORCHESTRATE_STORE_RETRY_SECS`, default 60 s).
pub fn retry_window() -> Duration {
    let secs = std::env::var("ORCHESTRATE_STORE_RETRY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// The locks of runs producing now, as `gc` sees them.
#[derive(Debug, Default)]
pub struct LiveLocks {
    pub holders: Vec<LockInfo>,
    /// Locks that do not read as ours: counted as producing, by nobody known.
    pub unreadable: usize,
}

impl LiveLocks {
    pub fn count(&self) -> usize {
        self.holders.len() + self.unreadable
    }
}

/// The content of a lock object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockInfo {
    pub run_id: String,
    pub stage: String,
    pub host: String,
    pub pid: u32,
    /// The holder's PID namespace (`pid:[4026531836]`): containers may share a host name,
    /// and a PID means something only within its namespace.
    #[serde(default)]
    pub pid_ns: String,
    /// The holder's boot (`/proc/sys/kernel/random/boot_id`): every host outside a container
    /// has the same PID namespace, and two CI machines may share a host name (`runner`), so
    /// only a lock from this very boot is judged by whether its PID still runs here.
    #[serde(default)]
    pub boot_id: String,
    /// Unix seconds.
    pub expires_at: u64,
}

impl LockInfo {
    /// A lock is stale after its lease, or at once when its holder ran on this host, in this
    /// boot and PID namespace, and is gone. (A lock from a version that did not record its
    /// boot holds until its lease runs out.)
    pub fn is_stale(&self) -> bool {
        if unix_now() > self.expires_at {
            return true;
        }
        self.host == hostname()
            && !self.boot_id.is_empty()
            && self.boot_id == boot_id()
            && !self.pid_ns.is_empty()
            && self.pid_ns == pid_namespace()
            && !Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    /// Whether `other` is this same holder's lock (at any lease).
    pub fn same_holder(&self, other: &LockInfo) -> bool {
        (
            &self.run_id,
            &self.stage,
            &self.host,
            self.pid,
            &self.pid_ns,
        ) == (
            &other.run_id,
            &other.stage,
            &other.host,
            other.pid,
            &other.pid_ns,
        )
    }
}

/// This machine's boot, as the kernel names it; empty where unknown.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

/// This process's PID namespace, as `/proc/self/ns/pid` names it; empty where unknown.
pub fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

pub enum LockAttempt {
    Acquired,
    HeldBy(LockInfo),
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    url: String,
    /// A `file://` store's folder (see [`Store::staging_leftovers`]).
    local_root: Option<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

/// The folder a `file://` store URL names, relative ones against `base`; None for others.
pub fn local_dir(url: &str, base: &Path) -> Option<PathBuf> {
    let rest = url.strip_prefix("file://")?;
    Some(if Path::new(rest).is_absolute() {
        PathBuf::from(rest)
    } else {
        base.join(rest)
    })
}

/// What makes `url` no store URL, if anything: `validate` and the command line check it
/// before anything is opened.
pub fn url_problem(url: &str) -> Option<&'static str> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let bucket = rest.split('/').next().unwrap_or_default();
        return bucket
            .is_empty()
            .then_some("no bucket named: use `s3://BUCKET` or `s3://BUCKET/PREFIX`");
    }
    if let Some(dir) = url.strip_prefix("file://") {
        if dir.starts_with('~') {
            // No shell expands it here: `file://~/x` would be a folder named `~` in the
            // working directory.
            return Some("`~` is not expanded in a store URL: write the folder's whole path (`file:///home/NAME/x`, or `file://$HOME/x` for the shell to expand)");
        }
        return dir
            .is_empty()
            .then_some("no directory named: use `file://DIR`");
    }
    Some("use `file://DIR` or `s3://BUCKET/PREFIX`")
}

impl Store {
    /// Opens `file://DIR` (relative to `base`) or `s3://BUCKET[/PREFIX]`. S3 settings come
    /// from the usual `AWS_*` variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, credentials);
    /// path-style addressing is used unless `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`.
    pub fn open(url: &str, base: &Path) -> Result<Store> {
        let open_err = |reason: String| StoreError::Open {
            url: url.to_string(),
            reason,
        };
        if let Some(reason) = url_problem(url) {
            return Err(StoreError::Url {
                url: url.to_string(),
                reason: reason.into(),
            });
        }
        let local_root = local_dir(url, base);
        let inner: Arc<dyn ObjectStore> = if let Some(dir) = &local_root {
            if dir.exists() && !dir.is_dir() {
                return Err(open_err(format!(
                    "{} is a file: a file:// store is a folder",
                    dir.display()
                )));
            }
            std::fs::create_dir_all(dir)
                .map_err(|e| open_err(format!("{}: {e}", dir.display())))?;
            Arc::new(LocalFileSystem::new_with_prefix(dir).map_err(|e| open_err(e.to_string()))?)
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
            let endpoint = std::env::var("AWS_ENDPOINT_URL")
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .ok();
            if let Some(ep) = &endpoint {
                b = b
                    .with_endpoint(ep)
                    .with_allow_http(ep.starts_with("http://"));
            }
            if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err()
            {
                b = b.with_region("us-east-1");
            }
            let env_num = |name: &str, default: u64| {
                std::env::var(name)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(default)
            };
            let s3 = b
                .with_retry(object_store::RetryConfig {
                    max_retries: env_num("ORCHESTRATE_STORE_RETRIES", 5) as usize,
                    retry_timeout: retry_window(),
                    backoff: Default::default(),
                })
                .build()
                .map_err(|e| open_err(e.to_string()))?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
            }
        } else {
            unreachable!("url_problem accepts file:// and s3:// URLs only")
        };
        Ok(Store {
            inner,
            url: url.to_string(),
            local_root,
        })
    }

    /// Removes (or, `dry_run`, counts) what writes killed halfway left in a `file://` store
    /// and not written since `before`: object_store writes each object to `NAME#N` beside
    /// it and renames it into place, and its listings pass such files over, so nothing else
    /// would ever see them (a killed upload of a model leaves its size behind). Returns how
    /// many and their bytes. What cannot be read or removed (a folder gone meanwhile) is
    /// passed over: this is tidying, not the collection. An `s3://` store's incomplete
    /// multipart uploads are the bucket's lifecycle rule's to end
    /// (`AbortIncompleteMultipartUpload`). Blocking: walks the folder.
    pub fn staging_leftovers(&self, before: SystemTime, dry_run: bool) -> (usize, u64) {
        let Some(root) = &self.local_root else {
            return (0, 0);
        };
        let mut found = (0, 0);
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    dirs.push(entry.path());
                    continue;
                }
                // As object_store tells its staging files from objects: the first `#`
                // followed by digits alone.
                let name = entry.file_name();
                let staged = name
                    .to_str()
                    .and_then(|n| n.split_once('#'))
                    .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
                if !staged || meta.modified().map_or(true, |t| t >= before) {
                    continue;
                }
                if dry_run || std::fs::remove_file(entry.path()).is_ok() {
                    found.0 += 1;
                    found.1 += meta.len();
                }
            }
        }
        found
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the store refuses a second create-only write (`If-None-Match: *` on S3) of
    /// one object, as locks and commits need: on a server that ignores the condition (AWS S3
    /// before August 2024, older S3-compatible servers), every waiter would take every lock
    /// and the last commit, not the first, would win. Asked once per run, with a probe
    /// object written twice and deleted (a `file://` store always does).
    pub async fn check_create_only(&self) -> Result<()> {
        if self.local_root.is_some() {
            return Ok(());
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = ObjPath::from(format!(
            "probes/{}-{}-{nanos}.json",
            hostname(),
            std::process::id()
        ));
        self.put_json(&path, &"create-only probe", PutMode::Create)
            .await
            .map_err(Self::backend("write", &path))?;
        let again = self
            .put_json(&path, &"create-only probe", PutMode::Create)
            .await;
        let _ = self.inner.delete(&path).await;
        match again {
            Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(Self::backend("write", &path)(e)),
            Ok(()) => Err(StoreError::Open {
                url: self.url.clone(),
                reason: "this S3 server does not honour create-only writes (If-None-Match: *): a second write of an object succeeded, so two runs could both take one lock; use a server that does (AWS S3, MinIO, Ceph and R2 do today)".into(),
            }),
        }
    }

    /// Which store this is, the same however it was named: a `file://` store's folder, made
    /// absolute; an S3 one's URL with the endpoint it is reached at.
    pub fn identity(&self) -> String {
        match &self.local_root {
            Some(dir) => {
                let dir = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                format!("file://{}", dir.display())
            }
            None => {
                let endpoint = std::env::var("AWS_ENDPOINT_URL")
                    .or_else(|_| std::env::var("AWS_ENDPOINT"))
                    .unwrap_or_default();
                format!("{} at {endpoint}", self.url)
            }
        }
    }

    fn backend<'p>(
        op: &'static str,
        path: &'p ObjPath,
    ) -> impl FnOnce(object_store::Error) -> StoreError + 'p {
        move |source| StoreError::Backend {
            op,
            path: path.to_string(),
            source,
        }
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        path: &ObjPath,
        what: &'static str,
    ) -> Result<Option<T>> {
        match self.inner.get(path).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(Self::backend("read", path))?;
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Decode {
                        what,
                        path: path.to_string(),
                        reason: e.to_string(),
                    })
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::backend("read", path)(e)),
        }
    }

    async fn put_json<T: Serialize>(
        &self,
        path: &ObjPath,
        value: &T,
        mode: PutMode,
    ) -> std::result::Result<(), object_store::Error> {
        let bytes = serde_json::to_vec_pretty(value).expect("plain JSON");
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        self.inner
            .put_opts(path, PutPayload::from(bytes), opts)
            .await
            .map(|_| ())
    }

    async fn list_paths(&self, prefix: &str) -> Result<Vec<object_store::ObjectMeta>> {
        let p = ObjPath::from(prefix);
        self.inner
            .list(Some(&p))
            .try_collect()
            .await
            .map_err(Self::backend("list", &p))
    }

    // ---- blobs ----

    fn blob_path(digest: &str) -> ObjPath {
        let hex = digest.strip_prefix("blake3:").unwrap_or(digest);
        // (By bytes, so that no digest can make this panic: entries read are checked.)
        let dir = hex.get(..2).unwrap_or(hex);
        ObjPath::from(format!("blobs/{dir}/{hex}"))
    }

    /// Stores a local file as a blob (skipped when the store already has it).
    ///
    /// What is stored is what was hashed: a file up to [`MULTIPART_THRESHOLD`] is read once,
    /// and a larger one is hashed again as it is uploaded, the upload abandoned where the
    /// two differ. A file that changed between the two reads (an output that links to a
    /// file something else writes) would otherwise be stored under a digest that is not
    /// its own, and kept so: a later upload finds the blob there and skips it.
    pub async fn put_file(&self, file: &Path, rel: &str) -> Result<FileEntry> {
        let f = file.to_path_buf();
        let (digest, size, small, executable) = tokio::task::spawn_blocking(
            move || -> std::io::Result<(String, u64, Option<Vec<u8>>, bool)> {
                use std::os::unix::fs::PermissionsExt;
                let meta = std::fs::metadata(&f)?;
                let executable = meta.permissions().mode() & 0o111 != 0;
                if meta.len() <= MULTIPART_THRESHOLD {
                    let bytes = std::fs::read(&f)?;
                    let digest = format!("blake3:{}", blake3::hash(&bytes).to_hex());
                    return Ok((digest, bytes.len() as u64, Some(bytes), executable));
                }
                let mut hasher = blake3::Hasher::new();
                let mut reader = std::fs::File::open(&f)?;
                let size = std::io::copy(&mut reader, &mut hasher)?;
                let digest = format!("blake3:{}", hasher.finalize().to_hex());
                Ok((digest, size, None, executable))
            },
        )
        .await
        .expect("hashing does not panic")
        .map_err(|e| StoreError::io(format!("cannot read output file {}", file.display()), e))?;
        let path = Self::blob_path(&digest);
        let exists = match self.inner.head(&path).await {
            Ok(meta) => meta.size == size,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(Self::backend("check", &path)(e)),
        };
        if !exists {
            match small {
                Some(bytes) => self
                    .inner
                    .put(&path, PutPayload::from(bytes))
                    .await
                    .map(|_| ())
                    .map_err(Self::backend("write", &path))?,
                None => self.put_multipart(file, &path, &digest, size).await?,
            }
        }
        Ok(FileEntry {
            path: rel.to_string(),
            digest,
            size,
            executable,
        })
    }

    /// Uploads `file` (`size` bytes) in parts, and completes the upload only if its bytes
    /// hash to `digest`.
    async fn put_multipart(
        &self,
        file: &Path,
        path: &ObjPath,
        digest: &str,
        size: u64,
    ) -> Result<()> {
        use tokio::io::AsyncReadExt;
        let upload = self
            .inner
            .put_multipart(path)
            .await
            .map_err(Self::backend("start upload of", path))?;
        let part_size = part_size(size);
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size);
        let result: Result<()> = async {
            let mut f = tokio::fs::File::open(file)
                .await
                .map_err(|e| StoreError::io(format!("cannot read {}", file.display()), e))?;
            let mut buf = vec![0u8; part_size];
            let mut hasher = blake3::Hasher::new();
            loop {
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(|e| StoreError::io(format!("cannot read {}", file.display()), e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                writer
                    .wait_for_capacity(4)
                    .await
                    .map_err(Self::backend("upload", path))?;
                writer.write(&buf[..n]);
            }
            let sent = format!("blake3:{}", hasher.finalize().to_hex());
            if sent != digest {
                return Err(StoreError::io(
                    format!("cannot store {}", file.display()),
                    std::io::Error::other(format!(
                        "it changed while being stored (hashed {digest}, then read as {sent})"
                    )),
                ));
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => writer
                .finish()
                .await
                .map(|_| ())
                .map_err(Self::backend("finish upload of", path)),
            Err(e) => {
                // Parts already sent would otherwise linger (and be billed) on real S3.
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Copies a blob to `dest`, verifying its digest; a mismatch is an error naming the blob.
    pub async fn get_file(&self, entry: &FileEntry, what: &str, dest: &Path) -> Result<()> {
        let path = Self::blob_path(&entry.digest);
        let result = self.inner.get(&path).await.map_err(|e| match e {
            // Named with the file and the artifact it belongs to, and what mends it.
            object_store::Error::NotFound { .. } => StoreError::Missing {
                path: path.to_string(),
                file: entry.path.clone(),
                what: what.to_string(),
            },
            e => Self::backend("read", &path)(e),
        })?;
        // A manifest whose size for a file is not its blob's is damaged (its own digest
        // covers the size it says): told so here, where `--repair` sets it aside, rather
        // than by the size check after materializing, as a failure to write.
        if result.meta.size != entry.size {
            return Err(StoreError::Corrupt {
                path: path.to_string(),
                file: entry.path.clone(),
                what: what.to_string(),
                expected: format!("{} bytes", entry.size),
                actual: format!("{} bytes", result.meta.size),
            });
        }
        let mut tmp_name = dest.as_os_str().to_owned();
        tmp_name.push(format!(".partial-{}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        if let Some(parent) = tmp.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| StoreError::io(format!("cannot create {}", parent.display()), e))?;
        }
        let mut out = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| StoreError::io(format!("cannot create {}", tmp.display()), e))?;
        let actual = Self::digest_of(result, &path, Some((&mut out, &tmp))).await?;
        out.flush().await.map_err(|e| StoreError::io("flush", e))?;
        if actual != entry.digest {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(StoreError::Corrupt {
                path: path.to_string(),
                file: entry.path.clone(),
                what: what.to_string(),
                expected: entry.digest.clone(),
                actual,
            });
        }
        if entry.executable {
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
                .await
                .map_err(|e| {
                    StoreError::io(format!("cannot make {} executable", tmp.display()), e)
                })?;
        }
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|e| StoreError::io(format!("cannot move {} into place", dest.display()), e))
    }

    /// The digest of the blob at `path` being read (`result`), hashed as it arrives (a
    /// model's blob need not fit in memory), and written to `out` on the way where given.
    async fn digest_of(
        result: object_store::GetResult,
        path: &ObjPath,
        mut out: Option<(&mut tokio::fs::File, &Path)>,
    ) -> Result<String> {
        let mut stream = result.into_stream();
        let mut hasher = blake3::Hasher::new();
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(Self::backend("read", path))?
        {
            hasher.update(&chunk);
            if let Some((file, name)) = out.as_mut() {
                file.write_all(&chunk)
                    .await
                    .map_err(|e| StoreError::io(format!("cannot write {}", name.display()), e))?;
            }
        }
        Ok(format!("blake3:{}", hasher.finalize().to_hex()))
    }

    /// Re-reads every blob of an artifact and returns the corrupt or missing ones, each with
    /// a description naming the blob and the file.
    pub async fn verify(&self, m: &Manifest) -> Result<Vec<(FileEntry, String)>> {
        self.verify_files(&m.files).await
    }

    /// Uploads again each of `files` (held under `dir`) whose blob is gone: one HEAD per
    /// file, and only the missing ones are read and sent.
    pub async fn put_back_missing(&self, files: &[FileEntry], dir: &Path) -> Result<()> {
        for f in files {
            let path = Self::blob_path(&f.digest);
            match self.inner.head(&path).await {
                Ok(_) => {}
                Err(object_store::Error::NotFound { .. }) => {
                    // The file changed since its manifest was made (a link whose target was
                    // rewritten): its new bytes would go under their own digest, and the
                    // manifest's blob would stay missing.
                    let put = self.put_file(&dir.join(&f.path), &f.path).await?;
                    if put.digest != f.digest {
                        return Err(StoreError::Missing {
                            path: path.to_string(),
                            file: f.path.clone(),
                            what: format!(
                                "the artifact just stored, whose file has changed since ({} now)",
                                put.digest
                            ),
                        });
                    }
                }
                Err(e) => return Err(Self::backend("check", &path)(e)),
            }
        }
        Ok(())
    }

    /// Each of `files` whose blob is missing or does not hash to its digest, and why.
    pub async fn verify_files(&self, files: &[FileEntry]) -> Result<Vec<(FileEntry, String)>> {
        let mut bad = Vec::new();
        for f in files {
            let path = Self::blob_path(&f.digest);
            match self.inner.get(&path).await {
                Ok(r) => {
                    let actual = Self::digest_of(r, &path, None).await?;
                    if actual != f.digest {
                        let why = format!(
                            "{} (file `{}`: expected {}, found {actual})",
                            path, f.path, f.digest
                        );
                        bad.push((f.clone(), why));
                    }
                }
                Err(object_store::Error::NotFound { .. }) => {
                    bad.push((f.clone(), format!("{path} (file `{}`: missing)", f.path)))
                }
                Err(e) => return Err(Self::backend("read", &path)(e)),
            }
        }
        Ok(bad)
    }

    /// Removes an artifact whose blobs failed [`Store::verify`], and the bad blobs with it, so
    /// that rebuilding it uploads them afresh.
    pub async fn discard_corrupt(&self, m: &Manifest, bad: &[(FileEntry, String)]) -> Result<()> {
        for (f, _) in bad {
            self.delete_blob(&f.digest).await?;
        }
        self.delete_manifest(&m.key).await
    }

    pub async fn delete_blob(&self, digest: &str) -> Result<()> {
        let p = Self::blob_path(digest);
        match self.inner.delete(&p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::backend("delete", &p)(e)),
        }
    }

    // ---- manifests ----

    fn manifest_path(key: &CacheKey) -> ObjPath {
        ObjPath::from(format!("manifests/{key}.json"))
    }

    /// The manifest stored under `key`. One that is not what that key holds is damage
    /// (`--repair` sets it aside): its digest not matching its files, another key inside
    /// (a manifest copied under another name would be served as this one), a file entry
    /// that is not a plain path inside the artifact or has no blake3 digest.
    pub async fn manifest(&self, key: &CacheKey) -> Result<Option<Manifest>> {
        let m: Option<Manifest> = self.get_json(&Self::manifest_path(key), "manifest").await?;
        if let Some(m) = &m {
            let problem = if &m.key != key {
                Some(format!("it holds key {}", m.key))
            } else if Manifest::content_digest(m.kind, &m.files) != m.digest {
                Some("its digest does not match its file list".into())
            } else {
                m.files.iter().find_map(FileEntry::problem)
            };
            if let Some(reason) = problem {
                return Err(StoreError::Decode {
                    what: "manifest",
                    path: Self::manifest_path(key).to_string(),
                    reason,
                });
            }
        }
        Ok(m)
    }

    /// Commits an artifact. Returns the manifest now in the store: ours, or the one another
    /// run committed first (create-only, so the first commit wins and is never replaced).
    pub async fn commit(&self, m: &Manifest) -> Result<Manifest> {
        let path = Self::manifest_path(&m.key);
        // Another's manifest can be there for the create and gone for the read after it
        // (`gc`, `fsck --repair`): the create is then tried again, a few times, rather
        // than this commit reported done with nothing stored.
        for _ in 0..3 {
            match self.put_json(&path, m, PutMode::Create).await {
                Ok(()) => {
                    self.note_history(m).await;
                    return Ok(m.clone());
                }
                Err(object_store::Error::AlreadyExists { .. }) => {
                    if let Some(existing) = self.manifest(&m.key).await? {
                        return Ok(existing);
                    }
                }
                Err(e) => return Err(Self::backend("commit", &path)(e)),
            }
        }
        Err(StoreError::Backend {
            op: "commit",
            path: path.to_string(),
            source: object_store::Error::Generic {
                store: "orchestrate",
                source: "the manifest was there for each create and gone for each read after it"
                    .into(),
            },
        })
    }

    /// Commits `m` over whatever the key holds (`run --force`: the user asked for this run's
    /// output, and a stage whose output changed under one key, say one reading a file it
    /// does not declare, would otherwise keep the stale one). Returns the manifest replaced.
    pub async fn commit_replacing(&self, m: &Manifest) -> Result<Option<Manifest>> {
        let previous = self.manifest(&m.key).await.ok().flatten();
        let path = Self::manifest_path(&m.key);
        self.put_json(&path, m, PutMode::Overwrite)
            .await
            .map_err(Self::backend("commit", &path))?;
        self.note_history(m).await;
        Ok(previous)
    }

    async fn note_history(&self, m: &Manifest) {
        let entry = HistoryEntry {
            key: m.key.clone(),
            created_at: m.producer.created_at.clone(),
            parts: m.key_parts.clone(),
        };
        let hpath = ObjPath::from(format!("history/{}/{}/{}.json", m.pipeline, m.stage, m.key));
        // The artifact is committed: history only lets `plan` explain a later key, so a
        // failure to write it must not fail (or, with retries, rerun) the stage.
        let _ = self.put_json(&hpath, &entry, PutMode::Overwrite).await;
    }

    pub async fn delete_manifest(&self, key: &CacheKey) -> Result<()> {
        let p = Self::manifest_path(key);
        match self.inner.delete(&p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::backend("delete", &p)(e)),
        }
    }

    pub async fn list_manifest_keys(&self) -> Result<Vec<(CacheKey, SystemTime)>> {
        Ok(self
            .list_paths("manifests")
            .await?
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?.strip_suffix(".json")?.to_string();
                Some((CacheKey(name), m.last_modified.into()))
            })
            .collect())
    }

    /// Earlier keys of a stage, newest first.
    pub async fn history(&self, pipeline: &str, stage: &str) -> Result<Vec<HistoryEntry>> {
        let metas = self
            .list_paths(&format!("history/{pipeline}/{stage}"))
            .await?;
        let mut out = Vec::new();
        for m in metas {
            // History only explains a new key: a damaged entry is passed over, not a reason
            // to stop a run (`fsck --repair` removes it).
            match self
                .get_json::<HistoryEntry>(&m.location, "history entry")
                .await
            {
                Ok(Some(e)) => out.push(e),
                Ok(None) => {}
                Err(e) if e.is_damage() => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at));
        Ok(out)
    }

    /// History entries that are not JSON (paths in the store). One this version cannot
    /// read but that parses may be a newer version's, in a shared store: not damaged.
    pub async fn damaged_history(&self) -> Result<Vec<String>> {
        let mut damaged = Vec::new();
        for m in self.list_paths("history").await? {
            match self
                .get_json::<serde_json::Value>(&m.location, "history entry")
                .await
            {
                Err(e) if e.is_damage() => damaged.push(m.location.to_string()),
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        Ok(damaged)
    }

    pub async fn remove_history(&self, path: &str) -> Result<()> {
        self.delete_if_present(&ObjPath::from(path))
            .await
            .map(|_| ())
    }

    /// Deletes the history of keys not in `keep`, except each stage's newest
    /// [`HISTORY_KEPT`] entries: `plan` compares a new key with these, and says "collected"
    /// rather than "never run" for a stage whose artifact gc took.
    pub async fn prune_history(&self, keep: &std::collections::HashSet<CacheKey>) -> Result<usize> {
        let mut by_stage: std::collections::BTreeMap<String, Vec<object_store::ObjectMeta>> =
            Default::default();
        for m in self.list_paths("history").await? {
            let stage = m
                .location
                .as_ref()
                .rsplit_once('/')
                .map(|(d, _)| d.to_string());
            by_stage
                .entry(stage.unwrap_or_default())
                .or_default()
                .push(m);
        }
        let mut n = 0;
        for (_, mut entries) in by_stage {
            entries.sort_by_key(|m| std::cmp::Reverse(m.last_modified));
            for m in entries.iter().skip(HISTORY_KEPT) {
                let Some(key) = m.location.filename().and_then(|f| f.strip_suffix(".json")) else {
                    continue;
                };
                if !keep.contains(&CacheKey(key.to_string())) {
                    let _ = self.inner.delete(&m.location).await;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    // ---- locks ----

    fn lock_path(key: &CacheKey) -> ObjPath {
        ObjPath::from(format!("locks/{key}.json"))
    }

    /// Where a taker of a stale lock says so first: named by the stale lock's bytes, so that
    /// of all the waiters who found that one lock stale, only the one whose create-only write
    /// of this object succeeds deletes it.
    fn takeover_path(key: &CacheKey, stale: &[u8]) -> ObjPath {
        ObjPath::from(format!(
            "takeovers/{key}/{}.json",
            blake3::hash(stale).to_hex()
        ))
    }

    /// The object's bytes, or None where there is none.
    async fn get_bytes(&self, path: &ObjPath) -> Result<Option<bytes::Bytes>> {
        match self.inner.get(path).await {
            Ok(r) => r
                .bytes()
                .await
                .map(Some)
                .map_err(Self::backend("read", path)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::backend("read", path)(e)),
        }
    }

    /// Tries to take the lock for producing `key`. A stale lock (its lease over, its holder
    /// gone, or unreadable) is taken over by one waiter: read, delete and create are three
    /// steps, and two waiters finding it stale at once (a lease runs out for every waiter in
    /// the same second) both took it, the second deleting the first's new lock. So a taker
    /// first writes the lock's takeover object, create-only; one that finds it written waits
    /// as for a held lock, on its writer.
    pub async fn try_lock(&self, key: &CacheKey, info: &LockInfo) -> Result<LockAttempt> {
        let mut claimed = None;
        let attempt = self.try_lock_claiming(key, info, &mut claimed).await;
        if let Some(marker) = claimed {
            // Done with, taken over or not; one left by a killed taker goes with `gc`.
            let _ = self.inner.delete(&marker).await;
        }
        attempt
    }

    async fn try_lock_claiming(
        &self,
        key: &CacheKey,
        info: &LockInfo,
        claimed: &mut Option<ObjPath>,
    ) -> Result<LockAttempt> {
        let path = Self::lock_path(key);
        for _ in 0..2 {
            match self.put_json(&path, info, PutMode::Create).await {
                Ok(()) => return Ok(LockAttempt::Acquired),
                Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(Self::backend("lock", &path)(e)),
            }
            // Released between our put and our get: try again.
            let Some(found) = self.get_bytes(&path).await? else {
                continue;
            };
            match serde_json::from_slice::<LockInfo>(&found) {
                Ok(holder) => {
                    // Ours: a create that succeeded, though its reply was lost and retried.
                    if holder.same_holder(info) {
                        return Ok(LockAttempt::Acquired);
                    }
                    if !holder.is_stale() {
                        return Ok(LockAttempt::HeldBy(holder));
                    }
                }
                // Both backends write a lock whole: one that does not read as ours is
                // another version's, held for a lease after it was written, as `live_locks`
                // counts it.
                Err(_) => {
                    if let Some(holder) = self.unreadable_lock(&path, info).await? {
                        return Ok(LockAttempt::HeldBy(holder));
                    }
                }
            }
            let marker = Self::takeover_path(key, &found);
            match self.put_json(&marker, info, PutMode::Create).await {
                Ok(()) => *claimed = Some(marker),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    match self.taken_over_by(&marker).await? {
                        // Ours: a create that succeeded, though its reply was lost and the
                        // client retried it (it retries a server error even here).
                        Some(taker) if taker.same_holder(info) => *claimed = Some(marker),
                        Some(taker) => return Ok(LockAttempt::HeldBy(taker)),
                        None => continue,
                    }
                }
                Err(e) => return Err(Self::backend("lock", &marker)(e)),
            }
            // Re-read right before deleting: a lock retaken meanwhile (by a taker that got
            // here first and has finished since) is left alone.
            if self.get_bytes(&path).await?.as_deref() == Some(&found[..]) {
                let _ = self.inner.delete(&path).await;
            }
        }
        match self.get_json::<LockInfo>(&path, "lock").await? {
            Some(holder) => Ok(LockAttempt::HeldBy(holder)),
            None => Ok(LockAttempt::HeldBy(info.clone())),
        }
    }

    /// A lock at `path` that does not read as ours, as a holder to wait on until a lease has
    /// passed since it was written; None once it has (or it is gone).
    async fn unreadable_lock(&self, path: &ObjPath, info: &LockInfo) -> Result<Option<LockInfo>> {
        let written = match self.inner.head(path).await {
            Ok(meta) => meta.last_modified,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Self::backend("lock", path)(e)),
        };
        let lease = crate::exec::lock_lease().as_secs() as i64;
        let expires_at = (written.timestamp() + lease).max(0) as u64;
        Ok((expires_at >= unix_now()).then(|| LockInfo {
            run_id: "(a lock this version cannot read)".into(),
            stage: info.stage.clone(),
            host: "unknown".into(),
            pid: 0,
            pid_ns: String::new(),
            boot_id: String::new(),
            expires_at,
        }))
    }

    /// Who is taking the lock over, if anyone still is: a waiter waits on it as on a
    /// holder. One that died while taking it over (its takeover object stale as its lock
    /// would be, or unreadable) is cleared, and None says to try again, as when the taker
    /// has finished (its lock is then found).
    async fn taken_over_by(&self, marker: &ObjPath) -> Result<Option<LockInfo>> {
        let Some(found) = self.get_bytes(marker).await? else {
            return Ok(None);
        };
        match serde_json::from_slice::<LockInfo>(&found) {
            Ok(taker) if !taker.is_stale() => Ok(Some(taker)),
            _ => {
                if self.get_bytes(marker).await?.as_deref() == Some(&found[..]) {
                    let _ = self.inner.delete(marker).await;
                }
                Ok(None)
            }
        }
    }

    /// Removes the takeover objects whose takers' leases are over (or that cannot be read):
    /// left by takers killed while taking a lock over, which no waiter needs any more. And
    /// the probes of [`Store::check_create_only`] a run killed between its two writes left,
    /// an hour after they were written (a probe lives for three requests).
    pub async fn clear_leftover_markers(&self) -> Result<()> {
        for m in self.list_paths("takeovers").await? {
            // (Which deletes one that is stale.)
            self.taken_over_by(&m.location).await?;
        }
        for m in self.list_paths("probes").await? {
            let age = chrono::Utc::now() - m.last_modified;
            if age > chrono::Duration::hours(1) {
                let _ = self.inner.delete(&m.location).await;
            }
        }
        Ok(())
    }

    /// Locks whose holders are still producing (not stale): `gc` leaves unreferenced blobs
    /// alone while any exists, since an upload that found its blob already stored did not
    /// refresh that blob's age, and its manifest, which will name it, is not written yet.
    ///
    /// A lock that cannot be read (another version's, say) counts as live for as long as a
    /// lease lasts after it was written: whether its holder is producing is unknown, and
    /// taking its blobs would be the mistake that cannot be undone; a holder renews its lock
    /// within its lease, so an older one is left behind (else one left for good would stop
    /// every collection). One that cannot be fetched is an error, not a lock passed over.
    pub async fn live_locks(&self) -> Result<LiveLocks> {
        let mut live = LiveLocks::default();
        for m in self.list_paths("locks").await? {
            match self.get_json::<LockInfo>(&m.location, "lock").await {
                Ok(Some(info)) if !info.is_stale() => live.holders.push(info),
                // Released (or stale) since the listing.
                Ok(_) => {}
                Err(e) if e.is_damage() => {
                    let age = chrono::Utc::now() - m.last_modified;
                    if age
                        .to_std()
                        .map_or(true, |age| age < crate::exec::lock_lease())
                    {
                        live.unreadable += 1;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(live)
    }

    /// Extends our lease, if the lock is still ours. `Ok(false)`: it is not (our lease ran
    /// out, say while the store was unreachable, and another run took the key over); the
    /// lock is left to its new holder, and the create-only commit settles who stores what.
    pub async fn renew_lock(&self, key: &CacheKey, info: &LockInfo) -> Result<bool> {
        let path = Self::lock_path(key);
        match self.get_json::<LockInfo>(&path, "lock").await? {
            Some(current) if current.same_holder(info) => {}
            _ => return Ok(false),
        }
        self.put_json(&path, info, PutMode::Overwrite)
            .await
            .map_err(Self::backend("renew lock", &path))?;
        Ok(true)
    }

    /// Gives up our lock; one that is no longer ours is left alone.
    pub async fn release_lock(&self, key: &CacheKey, info: &LockInfo) {
        let path = Self::lock_path(key);
        if let Ok(Some(current)) = self.get_json::<LockInfo>(&path, "lock").await {
            if current.same_holder(info) {
                let _ = self.inner.delete(&path).await;
            }
        }
    }

    // ---- checkpoints ----

    /// Records a complete checkpoint (its blobs already stored) for `key` at `step`.
    pub async fn put_checkpoint(
        &self,
        key: &CacheKey,
        step: u64,
        files: &[FileEntry],
    ) -> Result<()> {
        let p = Self::checkpoint_path(key, step);
        self.put_json(&p, &files, PutMode::Overwrite)
            .await
            .map_err(Self::backend("write", &p))
    }

    fn checkpoint_path(key: &CacheKey, step: u64) -> ObjPath {
        ObjPath::from(format!("checkpoints/{key}/{step:012}.json"))
    }

    /// Every checkpoint record in the store: the key it belongs to and its step.
    pub async fn all_checkpoints(&self) -> Result<Vec<(CacheKey, u64)>> {
        let mut out: Vec<(CacheKey, u64)> = self
            .list_paths("checkpoints")
            .await?
            .into_iter()
            .filter_map(|m| {
                let step = m.location.filename()?.strip_suffix(".json")?.parse().ok()?;
                let mut parts = m
                    .location
                    .parts()
                    .skip_while(|p| p.as_ref() != "checkpoints");
                Some((CacheKey(parts.nth(1)?.as_ref().to_string()), step))
            })
            .collect();
        out.sort_by(|a, b| (&a.0 .0, a.1).cmp(&(&b.0 .0, b.1)));
        Ok(out)
    }

    /// The steps at which `key` has checkpoints, newest first.
    pub async fn checkpoint_steps(&self, key: &CacheKey) -> Result<Vec<u64>> {
        let mut steps: Vec<u64> = self
            .list_paths(&format!("checkpoints/{key}"))
            .await?
            .iter()
            .filter_map(|m| m.location.filename()?.strip_suffix(".json")?.parse().ok())
            .collect();
        steps.sort_unstable_by(|a, b| b.cmp(a));
        Ok(steps)
    }

    /// The files of `key`'s checkpoint at `step`.
    /// (Damage, as for a manifest, where an entry is not a plain path with a blake3 digest.)
    pub async fn checkpoint(&self, key: &CacheKey, step: u64) -> Result<Option<Vec<FileEntry>>> {
        let path = Self::checkpoint_path(key, step);
        let files: Option<Vec<FileEntry>> = self.get_json(&path, "checkpoint").await?;
        if let Some(reason) = files.iter().flatten().find_map(FileEntry::problem) {
            return Err(StoreError::Decode {
                what: "checkpoint",
                path: path.to_string(),
                reason,
            });
        }
        Ok(files)
    }

    /// Forgets a checkpoint found damaged (its blobs are left to `gc`).
    pub async fn drop_checkpoint(&self, key: &CacheKey, step: u64) -> Result<()> {
        self.delete_if_present(&Self::checkpoint_path(key, step))
            .await
            .map(|_| ())
    }

    /// Blobs that checkpoints of unfinished artifacts refer to: kept by `gc`, so that a killed
    /// training can still resume.
    /// (Those of the keys in `except` are left out.)
    pub async fn checkpoint_blobs(
        &self,
        except: &std::collections::HashSet<CacheKey>,
    ) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for (key, step) in self.all_checkpoints().await? {
            if except.contains(&key) {
                continue;
            }
            if let Some(files) = self.checkpoint(&key, step).await? {
                out.extend(files.into_iter().map(|f| f.digest));
            }
        }
        Ok(out)
    }

    /// Removes a finished artifact's checkpoints (their blobs go at the next `gc`).
    pub async fn drop_checkpoints(&self, key: &CacheKey) -> Result<()> {
        for m in self.list_paths(&format!("checkpoints/{key}")).await? {
            let _ = self.inner.delete(&m.location).await;
        }
        Ok(())
    }

    // ---- runs and pins ----

    pub async fn put_run<T: Serialize>(&self, id: &str, record: &T) -> Result<()> {
        let p = ObjPath::from(format!("runs/{id}.json"));
        self.put_json(&p, record, PutMode::Overwrite)
            .await
            .map_err(Self::backend("write", &p))
    }

    pub async fn get_run<T: for<'de> Deserialize<'de>>(&self, id: &str) -> Result<Option<T>> {
        self.get_json(&ObjPath::from(format!("runs/{id}.json")), "run record")
            .await
    }

    pub async fn delete_run(&self, id: &str) -> Result<()> {
        let p = ObjPath::from(format!("runs/{id}.json"));
        match self.inner.delete(&p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::backend("delete", &p)(e)),
        }
    }

    /// Run ids, oldest first (ids sort by start time).
    pub async fn list_run_ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .list_paths("runs")
            .await?
            .into_iter()
            .filter_map(|m| Some(m.location.filename()?.strip_suffix(".json")?.to_string()))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Pins `key` on behalf of `holder` (the run id that was pinned, or the key itself):
    /// one object per holder, `pinned/<key>/<holder>`, so that unpinning one run leaves the
    /// artifacts it shares with another pinned run pinned. (Before holders, a pin was one
    /// object `pins/<key>`; a folder cannot share that name on a file system, hence the new
    /// prefix. Old pins still count, and `unpin` removes them.)
    pub async fn pin(&self, key: &CacheKey, holder: &str) -> Result<()> {
        let p = Self::pin_path(key, holder);
        self.inner
            .put(&p, PutPayload::from(Bytes::from(holder.to_string())))
            .await
            .map(|_| ())
            .map_err(Self::backend("write", &p))
    }

    /// Removes `holder`'s pin on `key`; other holders' pins stay. An old-style pin
    /// (`pins/<key>`) goes too when it was made by `holder` or by `typed`, the name
    /// `unpin` was given (old pins kept the argument as typed: `last`, a run id). True if
    /// there was a pin to remove.
    pub async fn unpin(&self, key: &CacheKey, holder: &str, typed: &str) -> Result<bool> {
        let mut removed = self.delete_if_present(&Self::pin_path(key, holder)).await?;
        let legacy = ObjPath::from(format!("pins/{key}"));
        match self.inner.get(&legacy).await {
            Ok(got) => {
                let note = got.bytes().await.map_err(Self::backend("read", &legacy))?;
                if note.as_ref() == holder.as_bytes() || note.as_ref() == typed.as_bytes() {
                    removed |= self.delete_if_present(&legacy).await?;
                }
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(Self::backend("read", &legacy)(e)),
        }
        Ok(removed)
    }

    /// Removes every pin on `key`, whoever made it (`unpin KEY`). Returns the holders whose
    /// pins went (`pins` for an old-style pin).
    pub async fn unpin_every(&self, key: &CacheKey) -> Result<Vec<String>> {
        let mut holders = Vec::new();
        for (k, holder) in self.pin_holders().await? {
            if &k == key
                && self
                    .delete_if_present(&Self::pin_path(key, &holder))
                    .await?
            {
                holders.push(holder);
            }
        }
        if self
            .delete_if_present(&ObjPath::from(format!("pins/{key}")))
            .await?
        {
            holders.push("pins".into());
        }
        Ok(holders)
    }

    /// Every pin as (key, holder): the holder is the run id that was pinned, or the key.
    pub async fn pin_holders(&self) -> Result<Vec<(CacheKey, String)>> {
        let mut holders: Vec<(CacheKey, String)> = self
            .list_paths("pinned")
            .await?
            .iter()
            .filter_map(|m| {
                let mut parts = m.location.parts().skip_while(|p| p.as_ref() != "pinned");
                let key = parts.nth(1)?.as_ref().to_string();
                let holder = parts.next()?.as_ref().to_string();
                Some((CacheKey(key), holder))
            })
            .collect();
        // An old-style pin `pins/<key>` holds its holder as its contents.
        for m in self.list_paths("pins").await? {
            let Some(key) = m.location.filename().map(str::to_string) else {
                continue;
            };
            let got = self.inner.get(&m.location).await;
            let note = match got {
                Ok(got) => got
                    .bytes()
                    .await
                    .map_err(Self::backend("read", &m.location))?,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(Self::backend("read", &m.location)(e)),
            };
            holders.push((CacheKey(key), String::from_utf8_lossy(&note).into_owned()));
        }
        Ok(holders)
    }

    fn pin_path(key: &CacheKey, holder: &str) -> ObjPath {
        ObjPath::from_iter(["pinned", &key.0, holder])
    }

    async fn delete_if_present(&self, p: &ObjPath) -> Result<bool> {
        match self.inner.delete(p).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Self::backend("delete", p)(e)),
        }
    }

    /// Every pinned key, whoever pinned it (old-style pins included).
    pub async fn pins(&self) -> Result<Vec<CacheKey>> {
        let key_after = |m: &object_store::ObjectMeta, prefix: &str| {
            let mut parts = m.location.parts().skip_while(|p| p.as_ref() != prefix);
            Some(CacheKey(parts.nth(1)?.as_ref().to_string()))
        };
        let mut keys: Vec<CacheKey> = Vec::new();
        for prefix in ["pinned", "pins"] {
            let listed = self.list_paths(prefix).await?;
            keys.extend(listed.iter().filter_map(|m| key_after(m, prefix)));
        }
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        keys.dedup();
        Ok(keys)
    }

    /// Every blob with its size and last-modified time.
    pub async fn list_blobs(&self) -> Result<Vec<(String, u64, SystemTime)>> {
        Ok(self
            .list_paths("blobs")
            .await?
            .into_iter()
            .filter_map(|m| {
                Some((
                    format!("blake3:{}", m.location.filename()?),
                    m.size,
                    m.last_modified.into(),
                ))
            })
            .collect())
    }
}

/// A fingerprint of what is under an object-store URL (names, sizes, ETags), for cache keys
/// of stages that read remote sources: a change there changes the key, nothing is downloaded.
pub async fn remote_fingerprint(url: &str) -> Result<String> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| StoreError::Open {
        url: url.to_string(),
        reason: "only s3:// sources are supported".into(),
    })?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    let store = Store::open(&format!("s3://{bucket}"), Path::new("."))?;
    let key = key.trim_matches('/');
    let mut metas = if key.is_empty() {
        store.list_paths("").await?
    } else {
        store.list_paths(key).await?
    };
    if metas.is_empty() && !key.is_empty() {
        // Not a prefix: maybe one object.
        let p = ObjPath::from(key);
        match store.inner.head(&p).await {
            Ok(m) => metas.push(m),
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::Open {
                    url: url.to_string(),
                    reason: "no such object or prefix".into(),
                })
            }
            Err(e) => return Err(Store::backend("check", &p)(e)),
        }
    }
    metas.sort_by(|a, b| a.location.cmp(&b.location));
    let mut h = blake3::Hasher::new();
    for m in &metas {
        h.update(m.location.as_ref().as_bytes());
        h.update(&m.size.to_le_bytes());
        h.update(m.e_tag.as_deref().unwrap_or("").as_bytes());
    }
    Ok(format!("listing:{}", h.finalize().to_hex()))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("store-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn blob_round_trip_and_corruption_is_named() {
        let d = tmp("blob");
        let store = Store::open("file://store", &d).unwrap();
        std::fs::write(d.join("f.txt"), "hello").unwrap();
        let e = store.put_file(&d.join("f.txt"), "f.txt").await.unwrap();
        assert_eq!(e.size, 5);
        store
            .get_file(&e, "artifact `a`", &d.join("out.txt"))
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(d.join("out.txt")).unwrap(), "hello");
        let hex = e.digest.strip_prefix("blake3:").unwrap();
        let blob = d.join(format!("store/blobs/{}/{hex}", &hex[..2]));
        std::fs::write(&blob, "hellp").unwrap();
        let err = store
            .get_file(&e, "artifact `a`", &d.join("out2.txt"))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("corrupt blob") && msg.contains(hex) && msg.contains("`f.txt`"),
            "{msg}"
        );
        assert!(!d.join("out2.txt").exists());
    }

    /// A manifest from a shared store is checked before anything is fetched by it: a file
    /// outside the artifact, a digest naming no blob, another key inside are damage.
    #[tokio::test]
    async fn a_manifest_that_is_not_its_key_s_or_reaches_outside_is_damage() {
        let d = tmp("manifest");
        let store = Store::open("file://store", &d).unwrap();
        let digest = format!("blake3:{}", "ab".repeat(32));
        let stored = |key: &str, path: &str, digest: &str| {
            let files = vec![FileEntry {
                path: path.into(),
                digest: digest.into(),
                size: 1,
                ..FileEntry::default()
            }];
            let m = serde_json::json!({
                "format": 1, "key": key, "kind": "Files", "pipeline": "p", "stage": "s",
                "digest": Manifest::content_digest(ArtifactKind::Files, &files),
                "files": files, "metadata": {},
                "producer": {"run_id": "r", "host": "h", "created_at": "", "duration_ms": 0},
                "key_parts": {"format": 1, "kind": "shell", "code": "c", "params": {},
                              "inputs": {}, "files": {}, "device": null},
            });
            let file = d.join("store/manifests/k.json");
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, m.to_string()).unwrap();
        };
        let key = CacheKey("k".into());
        stored("k", "out/a.txt", &digest);
        assert!(store.manifest(&key).await.unwrap().is_some());
        for (inside, path, digest, why) in [
            (
                "k",
                "../../.ssh/authorized_keys",
                digest.as_str(),
                "not a plain path",
            ),
            ("k", "/etc/passwd", digest.as_str(), "not a plain path"),
            ("k", "a//b", digest.as_str(), "not a plain path"),
            ("k", "a", "blake3:é", "no blake3 digest"),
            ("other", "a", digest.as_str(), "it holds key other"),
        ] {
            stored(inside, path, digest);
            let err = store.manifest(&key).await.unwrap_err();
            assert!(err.is_damage() && err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn store_urls_that_name_no_store_are_refused() {
        assert!(url_problem("file://~/x")
            .unwrap()
            .contains("`~` is not expanded"));
        assert!(url_problem("file://").is_some());
        assert!(url_problem("s3://").is_some());
        assert!(url_problem("http://x").is_some());
        assert_eq!(url_problem("file://a/~b"), None);
        assert_eq!(url_problem("s3://bucket/p"), None);
        let d = tmp("a-file");
        std::fs::write(d.join("f"), "").unwrap();
        let e = Store::open("file://f", &d).err().unwrap().to_string();
        assert!(e.contains("is a file: a file:// store is a folder"), "{e}");
    }

    #[test]
    fn parts_stay_within_s3_s_count() {
        assert_eq!(part_size(1 << 30), PART_SIZE);
        let huge = 200u64 << 30;
        assert!(huge.div_ceil(part_size(huge) as u64) <= MAX_PARTS);
    }

    #[tokio::test]
    async fn lock_is_exclusive_and_stale_locks_are_taken_over() {
        let d = tmp("lock");
        let store = Store::open("file://store", &d).unwrap();
        let key = CacheKey("k".into());
        let me = LockInfo {
            run_id: "r1".into(),
            stage: "s".into(),
            host: hostname(),
            pid: std::process::id(),
            pid_ns: pid_namespace(),
            boot_id: boot_id(),
            expires_at: unix_now() + 60,
        };
        assert!(matches!(
            store.try_lock(&key, &me).await.unwrap(),
            LockAttempt::Acquired
        ));
        let other = LockInfo {
            run_id: "r2".into(),
            ..me.clone()
        };
        assert!(
            matches!(store.try_lock(&key, &other).await.unwrap(), LockAttempt::HeldBy(h) if h.run_id == "r1")
        );
        // Only the holder renews or releases.
        assert!(!store.renew_lock(&key, &other).await.unwrap());
        store.release_lock(&key, &other).await;
        assert!(matches!(
            store.try_lock(&key, &other).await.unwrap(),
            LockAttempt::HeldBy(_)
        ));
        assert!(store.renew_lock(&key, &me).await.unwrap());
        store.release_lock(&key, &me).await;

        // A holder on this host whose process is gone is stale at once...
        let dead = LockInfo {
            pid: u32::MAX - 1,
            ..me.clone()
        };
        assert!(matches!(
            store.try_lock(&key, &dead).await.unwrap(),
            LockAttempt::Acquired
        ));
        assert!(matches!(
            store.try_lock(&key, &other).await.unwrap(),
            LockAttempt::Acquired
        ));
        store.release_lock(&key, &other).await;
        // ...but not one in another PID namespace (a container with the same host name),
        // whose PIDs mean nothing here: it holds until its lease runs out.
        let elsewhere = LockInfo {
            pid_ns: "pid:[1]".into(),
            ..dead.clone()
        };
        assert!(matches!(
            store.try_lock(&key, &elsewhere).await.unwrap(),
            LockAttempt::Acquired
        ));
        assert!(matches!(
            store.try_lock(&key, &other).await.unwrap(),
            LockAttempt::HeldBy(_)
        ));
        store.release_lock(&key, &elsewhere).await;
        // Nor one from another boot (another machine of the same host name, both outside
        // any container), nor one from a version that did not record its boot.
        for boot in ["another boot", ""] {
            let other_machine = LockInfo {
                boot_id: boot.into(),
                ..dead.clone()
            };
            assert!(matches!(
                store.try_lock(&key, &other_machine).await.unwrap(),
                LockAttempt::Acquired
            ));
            assert!(matches!(
                store.try_lock(&key, &other).await.unwrap(),
                LockAttempt::HeldBy(_)
            ));
            store.release_lock(&key, &other_machine).await;
        }
        // A lock that does not read as ours (another version's) holds for a lease.
        store
            .inner
            .put(&Store::lock_path(&key), "{\"holder\": 7}".into())
            .await
            .unwrap();
        assert!(
            matches!(store.try_lock(&key, &other).await.unwrap(), LockAttempt::HeldBy(h) if h.run_id.contains("cannot read"))
        );
    }

    /// Waiters that find one lock stale at the same moment (its lease ran out for all of
    /// them at once): exactly one takes it over. Read, delete and create are three steps,
    /// and a second taker deleted the first's new lock between them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn a_stale_lock_is_taken_over_by_one_waiter() {
        let d = tmp("takeover");
        let store = Store::open("file://store", &d).unwrap();
        for round in 0..20 {
            let key = CacheKey(format!("k{round}"));
            let expired = LockInfo {
                run_id: "gone".into(),
                stage: "s".into(),
                host: "elsewhere".into(),
                pid: 1,
                pid_ns: String::new(),
                boot_id: String::new(),
                expires_at: 0,
            };
            assert!(matches!(
                store.try_lock(&key, &expired).await.unwrap(),
                LockAttempt::Acquired
            ));
            let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
            let waiters: Vec<_> = (0..8)
                .map(|i| {
                    let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
                    tokio::spawn(async move {
                        let me = LockInfo {
                            run_id: format!("waiter{i}"),
                            stage: "s".into(),
                            host: format!("host{i}"),
                            pid: 1,
                            pid_ns: String::new(),
                            boot_id: String::new(),
                            expires_at: unix_now() + 60,
                        };
                        barrier.wait().await;
                        matches!(
                            store.try_lock(&key, &me).await.unwrap(),
                            LockAttempt::Acquired
                        )
                    })
                })
                .collect();
            let mut took = 0;
            for w in waiters {
                took += usize::from(w.await.unwrap());
            }
            assert_eq!(took, 1, "round {round}: {took} waiters took the lock over");
        }
        // A taker killed while taking a lock over blocks nobody once its own lease is over:
        // the next waiter takes the lock over.
        let key = CacheKey("killed-taker".into());
        let expired = |run_id: &str| LockInfo {
            run_id: run_id.into(),
            stage: "s".into(),
            host: "elsewhere".into(),
            pid: 1,
            pid_ns: String::new(),
            boot_id: String::new(),
            expires_at: 0,
        };
        store.try_lock(&key, &expired("gone")).await.unwrap();
        let stale = store
            .get_bytes(&Store::lock_path(&key))
            .await
            .unwrap()
            .unwrap();
        let marker = Store::takeover_path(&key, &stale);
        store
            .put_json(&marker, &expired("killed taker"), PutMode::Create)
            .await
            .unwrap();
        let me = LockInfo {
            expires_at: unix_now() + 60,
            ..expired("me")
        };
        let mut tries = 0;
        while !matches!(
            store.try_lock(&key, &me).await.unwrap(),
            LockAttempt::Acquired
        ) {
            tries += 1;
            assert!(tries < 3, "still not taken over");
        }
        // Its takeover object went with it; another left behind goes with gc.
        assert!(store.get_bytes(&marker).await.unwrap().is_none());
        store
            .put_json(&marker, &expired("killed taker"), PutMode::Create)
            .await
            .unwrap();
        // A create-only probe a killed run left goes after an hour; a fresh one stays.
        let probes = d.join("store/probes");
        std::fs::create_dir_all(&probes).unwrap();
        for name in ["old.json", "new.json"] {
            std::fs::write(probes.join(name), "\"create-only probe\"").unwrap();
        }
        std::fs::File::options()
            .write(true)
            .open(probes.join("old.json"))
            .unwrap()
            .set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        store.clear_leftover_markers().await.unwrap();
        assert!(store.get_bytes(&marker).await.unwrap().is_none());
        assert!(!probes.join("old.json").exists() && probes.join("new.json").exists());
    }
}
