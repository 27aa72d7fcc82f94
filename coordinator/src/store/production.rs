//! A repository's production state: reading it, stamping it on a CI run as it is dispatched,
//! and moving it to a deploy that finished (inside that deploy's finishing transaction).

use slimci_proto::{RepoName, RunId, Sha};
use sqlx::{Sqlite, Transaction};

use super::rows::production_state_from_row;
use super::{ProductionState, Result, Store};

impl Store {
    pub async fn production_state(&self, repository: &RepoName) -> Result<Option<ProductionState>> {
        let row = sqlx::query("SELECT * FROM production_state WHERE repository = ?")
            .bind(repository.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(production_state_from_row).transpose()
    }

    /// Stamps the production state a CI run compares against, as it is dispatched.
    pub async fn stamp_production_state(
        &self,
        id: RunId,
        production: &ProductionState,
    ) -> Result<()> {
        sqlx::query("UPDATE runs SET state_run_id = ?, state_sha = ?, state_manifest_sha256 = ? WHERE id = ? AND status = 'queued'")
            .bind(production.deploy_run_id.to_string())
            .bind(production.sha.as_str())
            .bind(&production.manifest_sha256)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Points `repository`'s production state at deploy `deploy`, in the transaction that ends it.
pub(super) async fn promote(
    transaction: &mut Transaction<'_, Sqlite>,
    repository: &RepoName,
    deploy: RunId,
    sha: &Sha,
    manifest_sha256: &str,
    at_ms: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO production_state (repository, deploy_run_id, sha, manifest_sha256, updated_ms)
         VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (repository) DO UPDATE SET deploy_run_id = excluded.deploy_run_id,
            sha = excluded.sha, manifest_sha256 = excluded.manifest_sha256, updated_ms = excluded.updated_ms",
    )
    .bind(repository.as_str())
    .bind(deploy.to_string())
    .bind(sha.as_str())
    .bind(manifest_sha256)
    .bind(at_ms)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// The sha256 of `run`'s stored `manifest.json`, if it was stored.
pub(super) async fn stored_manifest_sha256(
    transaction: &mut Transaction<'_, Sqlite>,
    run: RunId,
) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT sha256 FROM artifacts WHERE run_id = ? AND name = 'manifest.json'",
    )
    .bind(run.to_string())
    .fetch_optional(&mut **transaction)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{new_run, store};
    use super::*;
    use crate::store::ProductionStamp;
    use slimci_proto::RunKind;

    #[tokio::test]
    async fn a_ci_run_keeps_the_production_state_stamped_on_it() {
        let (_dir, store) = store().await;
        let deploy = new_run(RunKind::Deploy);
        store.insert_run(&deploy).await.unwrap();
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        assert_eq!(
            store.run(run.id).await.unwrap().unwrap().compared_against,
            None
        );
        let production = ProductionState {
            repository: run.repository.clone(),
            deploy_run_id: deploy.id,
            sha: Sha::parse(&"cd".repeat(20)).unwrap(),
            manifest_sha256: "cafe".into(),
            updated_ms: 0,
        };
        store
            .stamp_production_state(run.id, &production)
            .await
            .unwrap();
        assert_eq!(
            store.run(run.id).await.unwrap().unwrap().compared_against,
            Some(ProductionStamp {
                deploy_run_id: deploy.id,
                sha: production.sha,
                manifest_sha256: "cafe".into(),
            })
        );
    }
}
