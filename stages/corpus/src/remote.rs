//! Sources on an S3-compatible object store (`s3://bucket/prefix`), downloaded to scratch
//! before reading. Settings come from the usual `AWS_*` variables, as for the artifact store.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::ObjectStore;
use orchestrate_stage::StageError;

pub fn is_remote(path: &str) -> bool {
    path.starts_with("s3://")
}

#[cfg(test)]
type Buckets = std::collections::HashMap<String, Arc<dyn ObjectStore>>;

#[cfg(test)]
thread_local! {
    /// Stores the tests put in place of S3, by bucket name.
    pub static TEST_BUCKETS: std::cell::RefCell<Buckets> = Default::default();
}

/// Downloads the object, or every object under the prefix, into `dest`, keeping relative
/// paths. Returns each file written with the URL of the object it holds, which names it in
/// the corpus: the scratch folder differs from run to run, the URL does not.
///
/// Without `recursive`, only the objects directly under the prefix, as a local folder's
/// files without its subfolders; the objects passed over are counted in the second value.
pub fn download(
    url: &str,
    dest: &Path,
    recursive: bool,
) -> Result<(Vec<(PathBuf, String)>, usize), StageError> {
    let fail =
        |e: &dyn std::fmt::Display| StageError::Failed(format!("cannot read source {url}: {e}"));
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| fail(&"not an s3:// URL"))?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    let store = s3_store(bucket).map_err(|e| fail(&e))?;
    let work = fetch(store, bucket, key.trim_matches('/'), dest, recursive);
    // Stages run on the orchestrator's blocking threads, inside its runtime.
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(work),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail(&e))?
            .block_on(work),
    }
    .map_err(|e| fail(&e))
}

fn s3_store(bucket: &str) -> object_store::Result<Arc<dyn ObjectStore>> {
    #[cfg(test)]
    if let Some(store) = TEST_BUCKETS.with(|b| b.borrow().get(bucket).cloned()) {
        return Ok(store);
    }
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Ok(ep) = std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT")) {
        builder = builder
            .with_allow_http(ep.starts_with("http://"))
            .with_endpoint(ep);
    }
    if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
        builder = builder.with_region("us-east-1");
    }
    Ok(Arc::new(builder.build()?))
}

type FetchError = Box<dyn std::error::Error + Send + Sync>;

/// [`download`] from `store`, the bucket named `bucket`.
async fn fetch(
    store: Arc<dyn ObjectStore>,
    bucket: &str,
    key: &str,
    dest: &Path,
    recursive: bool,
) -> Result<(Vec<(PathBuf, String)>, usize), FetchError> {
    let prefix = ObjPath::from(key);
    let mut objects: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
    if objects.is_empty() {
        objects.push(store.head(&prefix).await?);
    }
    let below = |meta: &object_store::ObjectMeta| {
        let loc = meta.location.as_ref();
        loc.strip_prefix(key)
            .unwrap_or(loc)
            .trim_start_matches('/')
            .contains('/')
    };
    let listed = objects.len();
    if !recursive {
        objects.retain(|meta| !below(meta));
    }
    let passed_over = listed - objects.len();
    // Empty objects hold no records, and some are "folder" markers (`data/ru/`, made by the
    // AWS console, rclone, s3fs): listed without their trailing slash, they cannot be fetched
    // by that name, and a file of it would stand where the folder's objects go.
    objects.retain(|meta| meta.size > 0);
    if objects.is_empty() && passed_over > 0 {
        return Err(format!(
            "no object with any data directly there, and {passed_over} in sub-prefixes: `recursive: true` reads those"
        )
        .into());
    }
    if objects.is_empty() {
        return Err("no object with any data there".into());
    }
    let mut files = Vec::with_capacity(objects.len());
    for meta in &objects {
        let loc = meta.location.as_ref();
        let rel = loc.strip_prefix(key).unwrap_or(loc).trim_start_matches('/');
        let rel = if rel.is_empty() {
            meta.location.filename().unwrap_or("object")
        } else {
            rel
        };
        let target = dest.join(rel);
        save(store.as_ref(), &meta.location, &target)
            .await
            .map_err(|e| format!("{loc}: {e}"))?;
        files.push((target, format!("s3://{bucket}/{loc}")));
    }
    Ok((files, passed_over))
}

/// Writes the object to `target` chunk by chunk as it arrives, so a source of any size costs
/// one chunk of memory; through a temporary file, so `target` is only ever whole.
async fn save(
    store: &dyn ObjectStore,
    location: &ObjPath,
    target: &Path,
) -> Result<(), FetchError> {
    let parent = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = parent.join(format!(".{name}.partial"));
    let written = async {
        let mut stream = store.get(location).await?.into_stream();
        let mut file = std::fs::File::create(&partial)?;
        while let Some(chunk) = stream.try_next().await? {
            file.write_all(&chunk)?;
        }
        drop(file);
        std::fs::rename(&partial, target)?;
        Ok::<_, FetchError>(())
    }
    .await;
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::tempdir;
    use futures::StreamExt;
    use object_store::memory::InMemory;
    use object_store::PutPayload;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn put(store: &dyn ObjectStore, key: &str, data: &[u8]) {
        block_on(store.put(&ObjPath::from(key), PutPayload::from(data.to_vec()))).unwrap();
    }

    #[test]
    fn folder_markers_are_skipped() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        // What "Create folder" leaves: empty objects named like the folders, beside the files.
        put(store.as_ref(), "data/fortunes/", b"");
        put(store.as_ref(), "data/fortunes/ru/", b"");
        put(store.as_ref(), "data/fortunes/ru/love", b"one\n%\n");
        put(store.as_ref(), "data/fortunes/en", b"two\n%\n");
        let dest = tempdir("markers");
        let (files, _) = block_on(fetch(store.clone(), "b", "data/fortunes", &dest, true)).unwrap();
        let names: Vec<&str> = files.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            ["s3://b/data/fortunes/en", "s3://b/data/fortunes/ru/love"]
        );
        assert_eq!(std::fs::read(dest.join("ru/love")).unwrap(), b"one\n%\n");
        // Without `recursive`, as a folder without its subfolders: the nested object is
        // neither downloaded nor read, and counted.
        let dest = tempdir("markers-flat");
        let (files, passed_over) =
            block_on(fetch(store.clone(), "b", "data/fortunes", &dest, false)).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].1, "s3://b/data/fortunes/en");
        assert_eq!(passed_over, 1, "ru/love");
        assert!(!dest.join("ru").exists());
        let err = block_on(fetch(store.clone(), "b", "data", &tempdir("nested"), false))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`recursive: true` reads those"), "{err}");
        // A store holding only markers under the prefix is an error, as is a local source
        // that names no file.
        let only: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        put(only.as_ref(), "empty/", b"");
        let err = block_on(fetch(only, "b", "empty", &tempdir("markers3"), false)).unwrap_err();
        assert!(err.to_string().contains("no object"), "{err}");
    }

    #[test]
    fn a_single_object_is_named_by_its_url() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        put(store.as_ref(), "dumps/quotes.txt", b"a quote\n");
        for tag in ["single1", "single2"] {
            let dest = tempdir(tag);
            let (files, _) =
                block_on(fetch(store.clone(), "b", "dumps/quotes.txt", &dest, false)).unwrap();
            assert_eq!(
                files,
                [(
                    dest.join("quotes.txt"),
                    "s3://b/dumps/quotes.txt".to_string()
                )]
            );
        }
    }

    /// An in-memory store whose downloads come in small chunks, noting before each chunk how
    /// many bytes the download folder already holds.
    #[derive(Debug)]
    struct Observed {
        inner: InMemory,
        watch: PathBuf,
        seen: Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    }

    impl std::fmt::Display for Observed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Observed")
        }
    }

    fn bytes_under(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => bytes_under(&e.path()),
                _ => e.metadata().map(|m| m.len()).unwrap_or(0),
            })
            .sum()
    }

    type Fut<'a, T> =
        std::pin::Pin<Box<dyn std::future::Future<Output = object_store::Result<T>> + Send + 'a>>;

    // `ObjectStore` is an `async_trait`: its methods, written out, return boxed futures.
    impl ObjectStore for Observed {
        fn put_opts<'l0, 'l1, 'a>(
            &'l0 self,
            location: &'l1 ObjPath,
            payload: PutPayload,
            opts: object_store::PutOptions,
        ) -> Fut<'a, object_store::PutResult>
        where
            'l0: 'a,
            'l1: 'a,
            Self: 'a,
        {
            self.inner.put_opts(location, payload, opts)
        }

        fn put_multipart_opts<'l0, 'l1, 'a>(
            &'l0 self,
            location: &'l1 ObjPath,
            opts: object_store::PutMultipartOptions,
        ) -> Fut<'a, Box<dyn object_store::MultipartUpload>>
        where
            'l0: 'a,
            'l1: 'a,
            Self: 'a,
        {
            self.inner.put_multipart_opts(location, opts)
        }

        fn get_opts<'l0, 'l1, 'a>(
            &'l0 self,
            location: &'l1 ObjPath,
            options: object_store::GetOptions,
        ) -> Fut<'a, object_store::GetResult>
        where
            'l0: 'a,
            'l1: 'a,
            Self: 'a,
        {
            Box::pin(async move {
                let mut r = self.inner.get_opts(location, options).await?;
                let empty =
                    object_store::GetResultPayload::Stream(Box::pin(futures::stream::empty()));
                let object_store::GetResultPayload::Stream(whole) =
                    std::mem::replace(&mut r.payload, empty)
                else {
                    unreachable!("an in-memory object comes as a stream")
                };
                let whole = object_store::collect_bytes(whole, None).await?;
                let (watch, seen) = (self.watch.clone(), self.seen.clone());
                let chunks: Vec<_> = (0..whole.len())
                    .step_by(1000)
                    .map(|i| (i as u64, whole.slice(i..(i + 1000).min(whole.len()))))
                    .collect();
                let stream = futures::stream::iter(chunks).map(move |(sent, chunk)| {
                    seen.lock().unwrap().push((sent, bytes_under(&watch)));
                    Ok(chunk)
                });
                r.payload = object_store::GetResultPayload::Stream(Box::pin(stream));
                Ok(r)
            })
        }

        fn delete<'l0, 'l1, 'a>(&'l0 self, location: &'l1 ObjPath) -> Fut<'a, ()>
        where
            'l0: 'a,
            'l1: 'a,
            Self: 'a,
        {
            self.inner.delete(location)
        }

        fn list(
            &self,
            prefix: Option<&ObjPath>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }

        fn list_with_delimiter<'l0, 'l1, 'a>(
            &'l0 self,
            prefix: Option<&'l1 ObjPath>,
        ) -> Fut<'a, object_store::ListResult>
        where
            'l0: 'a,
            'l1: 'a,
            Self: 'a,
        {
            self.inner.list_with_delimiter(prefix)
        }

        fn copy<'l0, 'l1, 'l2, 'a>(&'l0 self, from: &'l1 ObjPath, to: &'l2 ObjPath) -> Fut<'a, ()>
        where
            'l0: 'a,
            'l1: 'a,
            'l2: 'a,
            Self: 'a,
        {
            self.inner.copy(from, to)
        }

        fn copy_if_not_exists<'l0, 'l1, 'l2, 'a>(
            &'l0 self,
            from: &'l1 ObjPath,
            to: &'l2 ObjPath,
        ) -> Fut<'a, ()>
        where
            'l0: 'a,
            'l1: 'a,
            'l2: 'a,
            Self: 'a,
        {
            self.inner.copy_if_not_exists(from, to)
        }
    }

    #[test]
    fn objects_are_written_as_they_arrive() {
        let dest = tempdir("streamed");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = Observed {
            inner: InMemory::new(),
            watch: dest.clone(),
            seen: seen.clone(),
        };
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        put(&store, "big/dump.jsonl", &data);
        let (files, _) = block_on(fetch(Arc::new(store), "b", "big", &dest, false)).unwrap();
        assert_eq!(std::fs::read(&files[0].0).unwrap(), data);
        // Each chunk was on disk before the next was asked for: nothing waits in memory.
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 10);
        for &(sent, on_disk) in seen.iter() {
            assert_eq!(on_disk, sent, "{seen:?}");
        }
        // No temporary file is left beside the object.
        assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 1);
    }
}
