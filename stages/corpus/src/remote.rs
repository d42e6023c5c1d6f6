//! Sources on an S3-compatible object store (`s3://bucket/prefix`), downloaded to scratch
//! before reading. Settings come from the usual `AWS_*` variables, as for the artifact store.

use std::path::Path;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::ObjectStore;
use orchestrate_stage::StageError;

pub fn is_remote(path: &str) -> bool {
    path.starts_with("s3://")
}

/// Downloads the object, or every object under the prefix, into `dest`, keeping relative
/// paths. Returns how many objects were fetched.
pub fn download(url: &str, dest: &Path) -> Result<usize, StageError> {
    let fail =
        |e: &dyn std::fmt::Display| StageError::Failed(format!("cannot read source {url}: {e}"));
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| fail(&"not an s3:// URL"))?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Ok(ep) = std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT")) {
        builder = builder
            .with_allow_http(ep.starts_with("http://"))
            .with_endpoint(ep);
    }
    if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
        builder = builder.with_region("us-east-1");
    }
    let store: Arc<dyn ObjectStore> = Arc::new(builder.build().map_err(|e| fail(&e))?);
    let key = key.trim_matches('/').to_string();
    let work = async move {
        let prefix = ObjPath::from(key.as_str());
        let mut objects: Vec<_> = store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| fail(&e))?;
        if objects.is_empty() {
            objects.push(store.head(&prefix).await.map_err(|e| fail(&e))?);
        }
        for meta in &objects {
            let loc = meta.location.as_ref();
            let rel = loc
                .strip_prefix(key.as_str())
                .unwrap_or(loc)
                .trim_start_matches('/');
            let rel = if rel.is_empty() {
                meta.location.filename().unwrap_or("object")
            } else {
                rel
            };
            let target = dest.join(rel);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| fail(&e))?;
            }
            let bytes = store
                .get(&meta.location)
                .await
                .map_err(|e| fail(&e))?
                .bytes()
                .await
                .map_err(|e| fail(&e))?;
            std::fs::write(&target, &bytes).map_err(|e| fail(&e))?;
        }
        Ok(objects.len())
    };
    // Stages run on the orchestrator's blocking threads, inside its runtime.
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(work),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail(&e))?
            .block_on(work),
    }
}
