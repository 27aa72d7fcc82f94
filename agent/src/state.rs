//! Production manifests, fetched from the coordinator and cached by their sha256.

use std::path::PathBuf;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use slimci_proto::ProductionStateRef;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot download the production manifest from {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("the production manifest at {url} answered HTTP {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
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
    root: PathBuf,
}

impl StateCache {
    pub fn new(root: PathBuf) -> StateCache {
        StateCache { root }
    }

    /// The directory holding `manifest.json` for this state, downloading it if needed.
    /// Returns the directory and whether it came from the cache.
    pub async fn get(
        &self,
        http: &reqwest::Client,
        token: &str,
        state: &ProductionStateRef,
    ) -> Result<(PathBuf, bool), StateError> {
        let digest = &state.manifest_sha256;
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StateError::BadDigest(digest.clone()));
        }
        let directory = self.root.join(digest);
        if directory.join("manifest.json").is_file() {
            return Ok((directory, true));
        }
        tokio::fs::create_dir_all(&self.root).await?;
        let url = &state.manifest_url;
        let response = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|source| StateError::Http {
                url: url.clone(),
                source,
            })?;
        if !response.status().is_success() {
            return Err(StateError::Status {
                url: url.clone(),
                status: response.status(),
            });
        }
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
        Ok((directory, false))
    }
}
