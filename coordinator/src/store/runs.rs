//! Runs as requests make and change them: inserting, reading and listing runs and their
//! records (phases, nodes, artifacts), ending a queued run, cancel requests, superseding, and
//! a queued run's position.

use slimci_proto::{IsolationName, NodeResult, PrNumber, RepoName, RunId, RunKind, Sha};

use sqlx::{Executor, Sqlite};

use super::rows::{artifact_from_row, node_from_row, phase_from_row, run_from_row};
use super::{ArtifactRecord, NewRun, PhaseRecord, Result, Run, RunFilter, Store, corrupt, now_ms};
use crate::rules::{self, RunStatus};

/// Reads run `id` through `executor` (the pool, or a transaction that will write it).
pub(super) async fn read_run<'e>(
    executor: impl Executor<'e, Database = Sqlite>,
    id: RunId,
) -> Result<Option<Run>> {
    let row = sqlx::query("SELECT * FROM runs WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(run_from_row).transpose()
}

/// Inserts `run` through `executor` (the pool, or the transaction that records a publish).
pub(super) async fn insert_run<'e>(
    executor: impl Executor<'e, Database = Sqlite>,
    run: &NewRun,
    now: i64,
) -> Result<()> {
    let production = run.production_state.as_ref();
    sqlx::query(
        "INSERT INTO runs (id, repository, kind, pr_number, sha, fetch_ref, isolation, status, message,
            created_ms, queued_ms, finished_ms, timeout_secs, state_run_id, state_sha, state_manifest_sha256,
            traceparent, triggered_by)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(run.id.to_string())
    .bind(run.repository.as_str())
    .bind(run.kind.as_str())
    .bind(run.pr.map(|pr| pr.0 as i64))
    .bind(run.sha.as_ref().map(Sha::as_str))
    .bind(&run.fetch_ref)
    .bind(run.isolation.as_ref().map(IsolationName::as_str))
    .bind(run.status.as_str())
    .bind(&run.message)
    .bind(now)
    .bind(now)
    .bind(run.status.is_terminal().then_some(now))
    .bind(run.timeout_secs as i64)
    .bind(production.map(|production| production.deploy_run_id.to_string()))
    .bind(production.map(|production| production.sha.as_str()))
    .bind(production.map(|production| production.manifest_sha256.as_str()))
    .bind(&run.traceparent)
    .bind(serde_json::to_string(&run.trigger).expect("a trigger serializes"))
    .execute(executor)
    .await?;
    Ok(())
}

/// Records `run`'s artifact through `executor`.
pub(super) async fn record_artifact<'e>(
    executor: impl Executor<'e, Database = Sqlite>,
    id: RunId,
    artifact: &ArtifactRecord,
) -> Result<()> {
    sqlx::query(
        "INSERT OR REPLACE INTO artifacts (run_id, name, size, sha256, created_ms) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(id.to_string())
    .bind(&artifact.name)
    .bind(artifact.size as i64)
    .bind(&artifact.sha256)
    .bind(artifact.created_ms)
    .execute(executor)
    .await?;
    Ok(())
}

/// What superseding a run changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Supersession {
    /// It had not started: it ended `superseded` now.
    Ended,
    /// It was running: it is marked, and the agents must be told to stop it.
    Stopping,
    /// It had ended, or was already superseded: nothing changed.
    Unchanged,
}

impl Store {
    pub async fn insert_run(&self, run: &NewRun) -> Result<()> {
        insert_run(&self.pool, run, now_ms()).await
    }

    pub async fn run(&self, id: RunId) -> Result<Option<Run>> {
        read_run(&self.pool, id).await
    }

    pub async fn runs(&self, filter: &RunFilter) -> Result<Vec<Run>> {
        let rows = sqlx::query(
            "SELECT * FROM runs
             WHERE (?1 IS NULL OR repository = ?1) AND (?2 IS NULL OR status = ?2)
             ORDER BY created_ms DESC, id DESC LIMIT ?3",
        )
        .bind(&filter.repository)
        .bind(filter.status.map(RunStatus::as_str))
        .bind(filter.limit.clamp(1, 1000) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    /// The queued and running runs of one repository, kind and PR (none for deploys): what a
    /// new submission may answer with or supersede, without reading the whole queue.
    pub async fn active_runs_of(
        &self,
        repository: &RepoName,
        kind: RunKind,
        pr: Option<PrNumber>,
    ) -> Result<Vec<Run>> {
        let rows = sqlx::query(
            "SELECT * FROM runs WHERE repository = ? AND kind = ? AND pr_number IS ? AND status IN ('queued', 'running') ORDER BY created_ms, id",
        )
        .bind(repository.as_str())
        .bind(kind.as_str())
        .bind(pr.map(|pr| pr.0 as i64))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    /// The newest CI run of a pull request.
    pub async fn latest_ci_run(&self, repository: &RepoName, pr: PrNumber) -> Result<Option<Run>> {
        let row = sqlx::query(
            "SELECT * FROM runs WHERE repository = ? AND pr_number = ? AND kind = 'ci' ORDER BY created_ms DESC, id DESC LIMIT 1",
        )
        .bind(repository.as_str())
        .bind(pr.0 as i64)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    /// Runs that are not terminal, for the status line at start-up.
    pub async fn count_active(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM runs WHERE status IN ('queued', 'running')")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Ended runs whose root span was not exported yet, oldest first.
    pub async fn runs_to_end_trace(&self, limit: u32) -> Result<Vec<Run>> {
        let rows = sqlx::query(
            "SELECT * FROM runs WHERE traceparent IS NOT NULL AND trace_ended = 0
               AND status NOT IN ('queued', 'running')
             ORDER BY finished_ms, id LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    pub async fn set_trace_ended(&self, id: RunId) -> Result<()> {
        sqlx::query("UPDATE runs SET trace_ended = 1 WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Per repository with queued runs: how many, and since when the longest waiting one has
    /// been queued (ms; a retried run waits since its last attempt was lost, not since its
    /// request).
    pub async fn queue_by_repository(&self) -> Result<Vec<(String, i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT repository, count(*), min(queued_ms) FROM runs WHERE status = 'queued'
             GROUP BY repository ORDER BY repository",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// How many runs there are of each kind in each status.
    pub async fn runs_by_kind_and_status(&self) -> Result<Vec<(RunKind, RunStatus, i64)>> {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT kind, status, count(*) FROM runs GROUP BY kind, status")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(kind, status, count)| {
                let kind =
                    RunKind::parse(&kind).ok_or_else(|| corrupt(format!("run kind {kind}")))?;
                let status = RunStatus::parse(&status)
                    .ok_or_else(|| corrupt(format!("run status {status}")))?;
                Ok((kind, status, count))
            })
            .collect()
    }

    pub async fn phases(&self, id: RunId) -> Result<Vec<PhaseRecord>> {
        let rows = sqlx::query(
            "SELECT attempt, phase, started_ms, finished_ms, ok FROM run_phases WHERE run_id = ? ORDER BY attempt, started_ms, rowid",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(phase_from_row).collect()
    }

    pub async fn nodes(&self, id: RunId) -> Result<Vec<NodeResult>> {
        let rows = sqlx::query("SELECT * FROM run_nodes WHERE run_id = ? ORDER BY rowid")
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(node_from_row).collect()
    }

    pub async fn record_artifact(&self, id: RunId, artifact: &ArtifactRecord) -> Result<()> {
        record_artifact(&self.pool, id, artifact).await
    }

    pub async fn artifacts(&self, id: RunId) -> Result<Vec<ArtifactRecord>> {
        let rows = sqlx::query(
            "SELECT name, size, sha256, created_ms FROM artifacts WHERE run_id = ? ORDER BY name",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(artifact_from_row).collect()
    }

    /// Ends a run that has not started (or was refused at admission) with `status`. Returns
    /// false if it had already left `queued`.
    pub async fn end_queued(&self, id: RunId, status: RunStatus, message: &str) -> Result<bool> {
        let updated = sqlx::query(
            "UPDATE runs SET status = ?, message = ?, finished_ms = ? WHERE id = ? AND status = 'queued'",
        )
        .bind(status.as_str())
        .bind(message)
        .bind(now_ms())
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// Asks the agents to stop running run `id`; false if it was not running or was already
    /// being stopped (nothing changed).
    pub async fn request_cancel(&self, id: RunId) -> Result<bool> {
        let updated = sqlx::query(
            "UPDATE runs SET cancel_requested = 1 WHERE id = ? AND status = 'running' AND cancel_requested = 0",
        )
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// Supersedes `old` by `newer`: a run that has not started ends now; a running one is
    /// marked, and ends `superseded` when its agent reports the tree gone.
    pub async fn supersede(&self, old: RunId, newer: RunId) -> Result<Supersession> {
        let message = rules::superseded_message(newer, None);
        if self
            .end_queued(old, RunStatus::Superseded, &message)
            .await?
        {
            return Ok(Supersession::Ended);
        }
        let updated = sqlx::query(
            "UPDATE runs SET superseded_by = ?, cancel_requested = 1
             WHERE id = ? AND status = 'running' AND superseded_by IS NULL",
        )
        .bind(newer.to_string())
        .bind(old.to_string())
        .execute(&self.pool)
        .await?;
        Ok(if updated.rows_affected() == 1 {
            Supersession::Stopping
        } else {
            Supersession::Unchanged
        })
    }

    /// 1 for the next queued run to start, 2 for the one after, ...; none once it started.
    pub async fn queue_position(&self, run: &Run) -> Result<Option<u32>> {
        if run.status != RunStatus::Queued {
            return Ok(None);
        }
        let ahead: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE status = 'queued' AND (created_ms < ?1 OR (created_ms = ?1 AND id < ?2))",
        )
        .bind(run.created_ms)
        .bind(run.id.to_string())
        .fetch_one(&self.pool)
        .await?;
        Ok(Some(ahead as u32 + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{LEASE, claim, new_run, store};
    use super::*;

    #[tokio::test]
    async fn superseding_or_cancelling_twice_changes_nothing_the_second_time() {
        let (_dir, store) = store().await;
        let queued = new_run(RunKind::Ci);
        store.insert_run(&queued).await.unwrap();
        let newer = RunId::new();
        assert_eq!(
            store.supersede(queued.id, newer).await.unwrap(),
            Supersession::Ended
        );
        assert_eq!(
            store.supersede(queued.id, newer).await.unwrap(),
            Supersession::Unchanged
        );

        let running = new_run(RunKind::Ci);
        store.insert_run(&running).await.unwrap();
        store.claim(&claim(&running), LEASE).await.unwrap();
        assert_eq!(
            store.supersede(running.id, newer).await.unwrap(),
            Supersession::Stopping
        );
        assert_eq!(
            store.supersede(running.id, RunId::new()).await.unwrap(),
            Supersession::Unchanged,
            "already being stopped for the first newer run"
        );
        let stored = store.run(running.id).await.unwrap().unwrap();
        assert_eq!(stored.superseded_by, Some(newer));

        let building = new_run(RunKind::Ci);
        store.insert_run(&building).await.unwrap();
        store.claim(&claim(&building), LEASE).await.unwrap();
        assert!(store.request_cancel(building.id).await.unwrap());
        assert!(
            !store.request_cancel(building.id).await.unwrap(),
            "already stopping"
        );
        assert!(
            !store.request_cancel(queued.id).await.unwrap(),
            "not running"
        );
    }
}
