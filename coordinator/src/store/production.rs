//! A repository's production state: reading it, stamping it on a CI run as it is dispatched,
//! and moving it, to a deploy that finished (inside that deploy's finishing transaction) or to
//! a manifest published from outside slimci (recorded as a finished `publish` run).

use slimci_proto::{RepoName, RunId, RunKind, Sha};
use sqlx::{Executor, Sqlite, Transaction};

use super::rows::production_state_from_row;
use super::runs::{insert_run, record_artifact};
use super::{ArtifactRecord, NewRun, ProductionState, Result, Store, corrupt};
use crate::rules::RunStatus;

/// A `manifest.json` published from outside slimci, already stored as the artifact of run
/// `id`; `record_publish` makes it a finished run and the production state.
#[derive(Debug, Clone)]
pub struct Publish {
    pub id: RunId,
    pub repository: RepoName,
    /// The commit the production run built.
    pub sha: Sha,
    /// The ref the run shows (the repository's production branch).
    pub fetch_ref: String,
    /// The stored `manifest.json`.
    pub manifest: ArtifactRecord,
    pub message: String,
    /// Who published it.
    pub trigger: slimci_client::Trigger,
    /// The dbt Cloud run it came from, if it did.
    pub dbt_cloud_run_id: Option<u64>,
    /// The root of the publish's trace, when traces are exported; the request exports the
    /// whole trace itself (`telemetry::publish`), so the run is recorded with it ended.
    pub traceparent: Option<String>,
}

async fn read_production_state<'e>(
    executor: impl Executor<'e, Database = Sqlite>,
    repository: &RepoName,
) -> Result<Option<ProductionState>> {
    let row = sqlx::query(
        "SELECT production_state.*, runs.kind, runs.dbt_cloud_run_id FROM production_state
         JOIN runs ON runs.id = production_state.deploy_run_id
         WHERE production_state.repository = ?",
    )
    .bind(repository.as_str())
    .fetch_optional(executor)
    .await?;
    row.as_ref().map(production_state_from_row).transpose()
}

impl Store {
    pub async fn production_state(&self, repository: &RepoName) -> Result<Option<ProductionState>> {
        read_production_state(&self.pool, repository).await
    }

    /// Records a published manifest as a `publish` run that ended `success`, with its
    /// `manifest.json`, and makes it the repository's production state: one transaction, as
    /// a finishing deploy promotes. CI runs already stamped keep their production state.
    pub async fn record_publish(&self, publish: &Publish) -> Result<ProductionState> {
        let at = publish.manifest.created_ms;
        let run = NewRun {
            id: publish.id,
            repository: publish.repository.clone(),
            kind: RunKind::Publish,
            pr: None,
            sha: Some(publish.sha.clone()),
            fetch_ref: publish.fetch_ref.clone(),
            isolation: None,
            timeout_secs: 0,
            production_state: None,
            status: RunStatus::Success,
            message: Some(publish.message.clone()),
            traceparent: publish.traceparent.clone(),
            trigger: publish.trigger.clone(),
        };
        let mut transaction = self.begin_immediate().await?;
        insert_run(&mut *transaction, &run, at).await?;
        // The request exported the publish's whole trace itself (`telemetry::publish`).
        sqlx::query("UPDATE runs SET trace_ended = 1, dbt_cloud_run_id = ? WHERE id = ?")
            .bind(publish.dbt_cloud_run_id.map(|run| run as i64))
            .bind(publish.id.to_string())
            .execute(&mut *transaction)
            .await?;
        record_artifact(&mut *transaction, publish.id, &publish.manifest).await?;
        promote(
            &mut transaction,
            &publish.repository,
            publish.id,
            &publish.sha,
            &publish.manifest.sha256,
            at,
        )
        .await?;
        let production = read_production_state(&mut *transaction, &publish.repository)
            .await?
            .ok_or_else(|| corrupt("production state missing right after a publish"))?;
        transaction.commit().await?;
        Ok(production)
    }

    /// The newest dbt Cloud run whose manifest `repository` imported, if any: the production
    /// import takes only newer ones.
    pub async fn latest_dbt_cloud_import(&self, repository: &RepoName) -> Result<Option<u64>> {
        let latest: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(dbt_cloud_run_id) FROM runs WHERE repository = ? AND kind = 'publish'",
        )
        .bind(repository.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(latest.map(|id| id as u64))
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
            run_kind: RunKind::Deploy,
            sha: Sha::parse(&"cd".repeat(20)).unwrap(),
            manifest_sha256: "cafe".into(),
            updated_ms: 0,
            dbt_cloud_run_id: None,
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

    #[tokio::test]
    async fn each_publish_is_a_finished_run_and_the_new_production_state() {
        let (_dir, store) = store().await;
        let repository = RepoName::parse("shop").unwrap();
        let publish = |sha: char, manifest_sha256: &str| Publish {
            id: RunId::new(),
            repository: repository.clone(),
            sha: Sha::parse(&sha.to_string().repeat(40)).unwrap(),
            fetch_ref: "refs/heads/main".into(),
            manifest: ArtifactRecord {
                name: "manifest.json".into(),
                size: 10,
                sha256: manifest_sha256.into(),
                created_ms: super::super::now_ms(),
            },
            message: "published".into(),
            trigger: slimci_client::Trigger::Cli {
                version: Some("0.1.0".into()),
            },
            dbt_cloud_run_id: None,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        };
        let first = publish('a', "f1");
        let production = store.record_publish(&first).await.unwrap();
        assert_eq!(production.deploy_run_id, first.id);
        assert_eq!(production.run_kind, RunKind::Publish);
        assert_eq!(production.manifest_sha256, "f1");
        let run = store.run(first.id).await.unwrap().unwrap();
        assert_eq!(run.kind, RunKind::Publish);
        assert_eq!(run.status, RunStatus::Success);
        assert!(run.finished_ms.is_some());
        assert_eq!(run.trigger, Some(first.trigger.clone()), "who published it");
        assert_eq!(store.artifacts(first.id).await.unwrap()[0].sha256, "f1");
        // Its trace id is the run's; the request exported the whole trace, root included.
        assert_eq!(run.traceparent, first.traceparent);
        assert!(store.runs_to_end_trace(10).await.unwrap().is_empty());

        // A CI run stamped with the first keeps it when the second moves production state.
        let ci = new_run(RunKind::Ci);
        store.insert_run(&ci).await.unwrap();
        store
            .stamp_production_state(ci.id, &production)
            .await
            .unwrap();
        let second = publish('b', "f2");
        let production = store.record_publish(&second).await.unwrap();
        assert_eq!(production.deploy_run_id, second.id);
        assert_eq!(
            store.production_state(&repository).await.unwrap(),
            Some(production)
        );
        let stamp = store
            .run(ci.id)
            .await
            .unwrap()
            .unwrap()
            .compared_against
            .unwrap();
        assert_eq!(stamp.deploy_run_id, first.id);
        assert_eq!(stamp.manifest_sha256, "f1");
        assert_eq!(
            store.latest_dbt_cloud_import(&repository).await.unwrap(),
            None
        );

        // An import from dbt Cloud carries its run id to the production state.
        let imported = Publish {
            dbt_cloud_run_id: Some(7001),
            ..publish('c', "f3")
        };
        let production = store.record_publish(&imported).await.unwrap();
        assert_eq!(production.dbt_cloud_run_id, Some(7001));
        assert_eq!(
            store.latest_dbt_cloud_import(&repository).await.unwrap(),
            Some(7001)
        );
    }
}
