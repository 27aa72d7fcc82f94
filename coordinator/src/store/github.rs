//! What the coordinator keeps for GitHub: webhook delivery ids (replay protection), pull
//! requests as webhooks describe them, the id of each PR's comment, the status last reported
//! for each run, and the PRs whose isolation the sweeper should look at.

use slimci_proto::{PrNumber, RepoName, RunId, Sha};

use super::rows::{pull_request_from_row, run_from_row, sweep_candidate_from_row};
use super::{PullRequest, Result, Run, Store, SweepCandidate, now_ms};
use crate::rules::RunStatus;

impl Store {
    /// Records a webhook delivery id; false if it was seen before (a replay).
    pub async fn record_delivery(&self, id: &str, event: &str) -> Result<bool> {
        let inserted = sqlx::query(
            "INSERT OR IGNORE INTO webhook_deliveries (id, event, received_ms) VALUES (?, ?, ?)",
        )
        .bind(id)
        .bind(event)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    /// Forgets a webhook delivery id, so the same delivery is processed when it comes again
    /// (after slimci failed to handle it).
    pub async fn forget_delivery(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM webhook_deliveries WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn upsert_pull_request(&self, pull: &PullRequest) -> Result<()> {
        sqlx::query(
            "INSERT INTO pull_requests (repository, pr, state, draft, head_sha, updated_ms) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (repository, pr) DO UPDATE SET state = excluded.state, draft = excluded.draft,
                head_sha = excluded.head_sha, updated_ms = excluded.updated_ms",
        )
        .bind(pull.repository.as_str())
        .bind(pull.pr.0 as i64)
        .bind(if pull.open { "open" } else { "closed" })
        .bind(pull.draft as i64)
        .bind(pull.head_sha.as_ref().map(Sha::as_str))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn pull_request(
        &self,
        repository: &RepoName,
        pr: PrNumber,
    ) -> Result<Option<PullRequest>> {
        let row = sqlx::query("SELECT * FROM pull_requests WHERE repository = ? AND pr = ?")
            .bind(repository.as_str())
            .bind(pr.0 as i64)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(pull_request_from_row).transpose()
    }

    pub async fn comment_id(&self, repository: &RepoName, pr: PrNumber) -> Result<Option<u64>> {
        let id: Option<i64> = sqlx::query_scalar(
            "SELECT comment_id FROM pr_comments WHERE repository = ? AND pr = ?",
        )
        .bind(repository.as_str())
        .bind(pr.0 as i64)
        .fetch_optional(&self.pool)
        .await?;
        Ok(id.map(|id| id as u64))
    }

    pub async fn set_comment_id(
        &self,
        repository: &RepoName,
        pr: PrNumber,
        comment_id: Option<u64>,
    ) -> Result<()> {
        match comment_id {
            Some(comment_id) => {
                sqlx::query("INSERT OR REPLACE INTO pr_comments (repository, pr, comment_id) VALUES (?, ?, ?)")
                    .bind(repository.as_str())
                    .bind(pr.0 as i64)
                    .bind(comment_id as i64)
                    .execute(&self.pool)
                    .await?;
            }
            None => {
                sqlx::query("DELETE FROM pr_comments WHERE repository = ? AND pr = ?")
                    .bind(repository.as_str())
                    .bind(pr.0 as i64)
                    .execute(&self.pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// Runs whose status differs from what GitHub was last told, oldest first.
    pub async fn runs_to_report(&self, limit: u32) -> Result<Vec<Run>> {
        let rows = sqlx::query(
            "SELECT * FROM runs WHERE kind IN ('ci', 'deploy') AND sha IS NOT NULL
               AND (github_reported IS NULL OR github_reported != status)
             ORDER BY created_ms, id LIMIT ?",
        )
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    pub async fn set_reported(&self, id: RunId, status: RunStatus) -> Result<()> {
        sqlx::query("UPDATE runs SET github_reported = ? WHERE id = ?")
            .bind(status.as_str())
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// PRs whose isolation may be left behind: CI builds all ended before `cutoff_ms`, and no
    /// teardown queued, running or succeeded since the last of them.
    pub async fn sweep_candidates(&self, cutoff_ms: i64) -> Result<Vec<SweepCandidate>> {
        let rows = sqlx::query(
            "WITH prs AS (
                SELECT repository, pr_number, max(finished_ms) AS last_finished, max(created_ms) AS last_created,
                       sum(status IN ('queued', 'running')) AS active
                FROM runs WHERE kind = 'ci' AND pr_number IS NOT NULL
                GROUP BY repository, pr_number)
             SELECT repository, pr_number, last_finished FROM prs
             WHERE active = 0 AND last_finished < ?1
               AND NOT EXISTS (
                   SELECT 1 FROM runs t
                   WHERE t.kind = 'teardown' AND t.repository = prs.repository AND t.pr_number = prs.pr_number
                     AND t.created_ms >= prs.last_created AND t.status IN ('queued', 'running', 'success'))",
        )
        .bind(cutoff_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sweep_candidate_from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{LEASE, claim, finished, new_run, store};
    use super::*;
    use crate::store::NewRun;
    use slimci_proto::{RunKind, RunResult};

    #[tokio::test]
    async fn a_forgotten_delivery_is_recorded_again_as_new() {
        let (_dir, store) = store().await;
        assert!(store.record_delivery("d-1", "push").await.unwrap());
        assert!(
            !store.record_delivery("d-1", "push").await.unwrap(),
            "a replay"
        );
        store.forget_delivery("d-1").await.unwrap();
        assert!(
            store.record_delivery("d-1", "push").await.unwrap(),
            "the redelivery of a failed delivery is new"
        );
        assert!(!store.record_delivery("d-1", "push").await.unwrap());
    }

    #[tokio::test]
    async fn sweep_candidates_are_finished_prs_without_a_later_teardown() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        assert!(
            store
                .sweep_candidates(now_ms() + 1000)
                .await
                .unwrap()
                .is_empty(),
            "still queued"
        );
        store.claim(&claim(&run), LEASE).await.unwrap();
        store
            .apply_event(&finished(&run, 1, RunResult::Success))
            .await
            .unwrap();
        assert!(
            store
                .sweep_candidates(now_ms() - 60_000)
                .await
                .unwrap()
                .is_empty(),
            "too recent"
        );
        let candidates = store.sweep_candidates(now_ms() + 1000).await.unwrap();
        assert_eq!(candidates.len(), 1, "{candidates:?}");
        assert_eq!(candidates[0].pr, PrNumber(4));
        let teardown = NewRun {
            id: RunId::new(),
            kind: RunKind::Teardown,
            sha: None,
            ..new_run(RunKind::Ci)
        };
        store.insert_run(&teardown).await.unwrap();
        assert!(
            store
                .sweep_candidates(now_ms() + 1000)
                .await
                .unwrap()
                .is_empty(),
            "a teardown is queued"
        );
    }
}
