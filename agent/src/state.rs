//! Production manifests, fetched from the coordinator and cached by their sha256.

use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use slimci_proto::ProductionStateRef;
use tokio::io::AsyncWriteExt;

use crate::cache::{Cache, Held};
use crate::coordinator_client::{CoordinatorClient, CoordinatorError};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot download the production manifest from {url}: {source}")]
    Download {
        url: String,
        source: CoordinatorError,
    },
    #[error("cannot download the production manifest from {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error(
        "the production manifest at {url} has sha256 {actual}, but the job expects {expected}; refusing to compare against it"
    )]
    Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("`{0}` is not a sha256")]
    BadDigest(String),
    #[error("state cache: {0}")]
    Io(#[from] std::io::Error),
}

pub struct StateCache {
    cache: Arc<Cache>,
    root: PathBuf,
}

/// A production manifest ready for a build, held in the cache until dropped.
pub struct CachedState {
    /// The directory holding `manifest.json` (dbt's `--state`).
    pub directory: PathBuf,
    /// Whether it was already cached.
    pub hit: bool,
    pub held: Held,
}

impl StateCache {
    pub fn new(cache: Arc<Cache>) -> StateCache {
        let root = cache.root().join("state");
        StateCache { cache, root }
    }

    /// The directory holding `manifest.json` for this state, downloading it if needed.
    pub async fn get(
        &self,
        coordinator: &CoordinatorClient,
        state: &ProductionStateRef,
    ) -> Result<CachedState, StateError> {
        let digest = &state.manifest_sha256;
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StateError::BadDigest(digest.clone()));
        }
        let held = self.cache.hold("state", digest)?;
        let directory = self.root.join(digest);
        if directory.join("manifest.json").is_file() {
            return Ok(CachedState {
                directory,
                hit: true,
                held,
            });
        }
        tokio::fs::create_dir_all(&self.root).await?;
        let url = &state.manifest_url;
        let response = coordinator
            .download(url)
            .await
            .map_err(|source| StateError::Download {
                url: url.clone(),
                source,
            })?;
        let partial = self
            .root
            .join(format!(".{digest}.{}.partial", uuid::Uuid::new_v4()));
        let mut file = tokio::fs::File::create(&partial).await?;
        let mut hasher = Sha256::new();
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| StateError::Http {
                url: url.clone(),
                source,
            })?;
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        let actual = hex::encode(hasher.finalize());
        if &actual != digest {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(StateError::Mismatch {
                url: url.clone(),
                expected: digest.clone(),
                actual,
            });
        }
        tokio::fs::create_dir_all(&directory).await?;
        tokio::fs::rename(&partial, directory.join("manifest.json")).await?;
        Ok(CachedState {
            directory,
            hit: false,
            held,
        })
    }
}
