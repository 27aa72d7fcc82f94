//! Artifact bytes on local disk: `artifacts/<run>/<name>`. Written to a temporary file while
//! hashing, then renamed into place, so a reader never sees half an artifact.

use std::path::PathBuf;

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use slimci_proto::RunId;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(
        "`{0}` is not an artifact name: use letters, digits, `.`, `_` and `-`, not starting with `.`"
    )]
    BadName(String),
    #[error("artifact is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("upload interrupted: {0}")]
    Body(String),
    #[error("artifact storage: {0}")]
    Io(#[from] std::io::Error),
}

pub fn valid_name(name: &str) -> bool {
    (1..=100).contains(&name.len())
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

pub struct ArtifactStore {
    dir: PathBuf,
}

pub struct Stored {
    pub size: u64,
    pub sha256: String,
}

impl ArtifactStore {
    pub fn new(dir: PathBuf) -> ArtifactStore {
        ArtifactStore { dir }
    }

    pub fn path(&self, run: RunId, name: &str) -> Result<PathBuf, ArtifactError> {
        if !valid_name(name) {
            return Err(ArtifactError::BadName(name.to_owned()));
        }
        Ok(self.dir.join(run.to_string()).join(name))
    }

    pub async fn put<S, E>(
        &self,
        run: RunId,
        name: &str,
        mut body: S,
        limit: u64,
    ) -> Result<Stored, ArtifactError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let path = self.path(run, name)?;
        let dir = path
            .parent()
            .expect("artifact path has a parent")
            .to_owned();
        tokio::fs::create_dir_all(&dir).await?;
        let temporary = dir.join(format!(".{name}.{}.partial", uuid::Uuid::new_v4()));
        let result = async {
            let mut file = tokio::fs::File::create(&temporary).await?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|error| ArtifactError::Body(error.to_string()))?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(ArtifactError::TooLarge { limit });
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await?;
            }
            file.sync_all().await?;
            tokio::fs::rename(&temporary, &path).await?;
            Ok(Stored {
                size,
                sha256: hex::encode(hasher.finalize()),
            })
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&temporary).await;
        }
        result
    }

    /// Removes every artifact of `run`: a publish refused after its body was stored.
    pub async fn remove_run(&self, run: RunId) -> Result<(), ArtifactError> {
        match tokio::fs::remove_dir_all(self.dir.join(run.to_string())).await {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error.into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_run_directory() {
        assert!(valid_name("manifest.json"));
        assert!(!valid_name("../slimci.db"));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
    }

    #[tokio::test]
    async fn oversized_uploads_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path().to_owned());
        let run = RunId::new();
        let body = futures::stream::iter(vec![Ok::<_, std::io::Error>(bytes::Bytes::from(vec![
                0u8;
                10
            ]))]);
        assert!(matches!(
            store.put(run, "big.json", body, 5).await,
            Err(ArtifactError::TooLarge { limit: 5 })
        ));
        let leftovers = std::fs::read_dir(dir.path().join(run.to_string()))
            .unwrap()
            .count();
        assert_eq!(leftovers, 0);
        let body = futures::stream::iter(vec![Ok::<_, std::io::Error>(bytes::Bytes::from_static(
            b"{}",
        ))]);
        let stored = store.put(run, "ok.json", body, 5).await.unwrap();
        assert_eq!(stored.size, 2);
        assert_eq!(
            stored.sha256,
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }
}
