//! What the web pages read and the API does not: runs filtered by pull request, node counts of
//! many runs at once, a repository's pull requests with their last run, its teardowns, and the
//! runs that hold or wait for the fleet. Read-only.

use std::collections::HashMap;

use slimci_proto::{PrNumber, RepoName, RunId};

use super::rows::{pull_request_from_row, run_from_row};
use super::{PullRequest, Result, Run, Store};
use crate::rules::RunStatus;

/// Which runs the run list shows, newest first.
#[derive(Debug, Clone, Default)]
pub struct PageFilter {
    pub repository: Option<RepoName>,
    pub pr: Option<PrNumber>,
    pub status: Option<RunStatus>,
    pub limit: u32,
}

/// How many nodes of one run had one resource type and dbt status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCount {
    pub resource_type: String,
    pub status: String,
    pub count: u32,
}

/// A pull request of a repository as its runs know it, with what webhooks said of it.
#[derive(Debug, Clone)]
pub struct PullRequestRuns {
    pub pr: PrNumber,
    /// Its newest CI run.
    pub last_run: Run,
    pub ci_runs: u32,
    /// Its newest teardown, if its isolation was dropped (or is being dropped).
    pub teardown: Option<Run>,
    /// What GitHub's webhooks said of it, when it came that way.
    pub known: Option<PullRequest>,
}

impl Store {
    pub async fn page_runs(&self, filter: &PageFilter) -> Result<Vec<Run>> {
        let rows = sqlx::query(
            "SELECT * FROM runs
             WHERE (?1 IS NULL OR repository = ?1) AND (?2 IS NULL OR pr_number = ?2)
               AND (?3 IS NULL OR status = ?3)
             ORDER BY created_ms DESC, id DESC LIMIT ?4",
        )
        .bind(filter.repository.as_ref().map(RepoName::as_str))
        .bind(filter.pr.map(|pr| pr.0 as i64))
        .bind(filter.status.map(RunStatus::as_str))
        .bind(filter.limit.clamp(1, 1000) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    /// Node counts by resource type and status, for each of `ids` that has nodes.
    pub async fn node_counts(&self, ids: &[RunId]) -> Result<HashMap<RunId, Vec<NodeCount>>> {
        let mut counts: HashMap<RunId, Vec<NodeCount>> = HashMap::new();
        // One query per run keeps the statement fixed; each is an index range scan.
        for id in ids {
            let rows: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT resource_type, status, count(*) FROM run_nodes WHERE run_id = ?
                 GROUP BY resource_type, status",
            )
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await?;
            if rows.is_empty() {
                continue;
            }
            counts.insert(
                *id,
                rows.into_iter()
                    .map(|(resource_type, status, count)| NodeCount {
                        resource_type,
                        status,
                        count: u32::try_from(count).unwrap_or(u32::MAX),
                    })
                    .collect(),
            );
        }
        Ok(counts)
    }

    /// The repository's pull requests that have CI runs, the most recently built first, at
    /// most `limit`.
    pub async fn pull_requests_with_runs(
        &self,
        repository: &RepoName,
        limit: u32,
    ) -> Result<Vec<PullRequestRuns>> {
        let prs: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT pr_number, count(*) FROM runs
             WHERE repository = ? AND kind = 'ci' AND pr_number IS NOT NULL
             GROUP BY pr_number ORDER BY max(created_ms) DESC LIMIT ?",
        )
        .bind(repository.as_str())
        .bind(limit.clamp(1, 1000) as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut found = Vec::with_capacity(prs.len());
        for (pr, ci_runs) in prs {
            let pr = PrNumber(u64::try_from(pr).unwrap_or_default());
            let Some(last_run) = self.latest_ci_run(repository, pr).await? else {
                continue;
            };
            let teardown = sqlx::query(
                "SELECT * FROM runs WHERE repository = ? AND pr_number = ? AND kind = 'teardown'
                 ORDER BY created_ms DESC, id DESC LIMIT 1",
            )
            .bind(repository.as_str())
            .bind(pr.0 as i64)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(run_from_row)
            .transpose()?;
            let known = sqlx::query("SELECT * FROM pull_requests WHERE repository = ? AND pr = ?")
                .bind(repository.as_str())
                .bind(pr.0 as i64)
                .fetch_optional(&self.pool)
                .await?
                .as_ref()
                .map(pull_request_from_row)
                .transpose()?;
            found.push(PullRequestRuns {
                pr,
                last_run,
                ci_runs: u32::try_from(ci_runs).unwrap_or(u32::MAX),
                teardown,
                known,
            });
        }
        Ok(found)
    }

    /// Runs of kind `kind` of one repository, newest first.
    pub async fn runs_of_kind(
        &self,
        repository: &RepoName,
        kind: slimci_proto::RunKind,
        limit: u32,
    ) -> Result<Vec<Run>> {
        let rows = sqlx::query(
            "SELECT * FROM runs WHERE repository = ? AND kind = ?
             ORDER BY created_ms DESC, id DESC LIMIT ?",
        )
        .bind(repository.as_str())
        .bind(kind.as_str())
        .bind(limit.clamp(1, 1000) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    /// Runs with status `status`, oldest first (for `queued`: the order they start in).
    pub async fn runs_with_status(&self, status: RunStatus, limit: u32) -> Result<Vec<Run>> {
        let rows =
            sqlx::query("SELECT * FROM runs WHERE status = ? ORDER BY created_ms, id LIMIT ?")
                .bind(status.as_str())
                .bind(limit.clamp(1, 10_000) as i64)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(run_from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{new_run, store};
    use slimci_proto::{IsolationName, RunKind};

    async fn ci_run(store: &Store, pr: u64) -> RunId {
        let mut run = new_run(RunKind::Ci);
        run.pr = Some(PrNumber(pr));
        run.isolation = Some(IsolationName::for_pr(&run.repository, PrNumber(pr)));
        store.insert_run(&run).await.unwrap();
        run.id
    }

    #[tokio::test]
    async fn runs_filter_by_pull_request_and_pull_requests_list_their_last_run() {
        let (_dir, store) = store().await;
        let one = ci_run(&store, 1).await;
        let two = ci_run(&store, 2).await;
        let found = store
            .page_runs(&PageFilter {
                pr: Some(PrNumber(1)),
                limit: 50,
                ..PageFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(found.iter().map(|run| run.id).collect::<Vec<_>>(), [one]);
        let prs = store
            .pull_requests_with_runs(&RepoName::parse("shop").unwrap(), 10)
            .await
            .unwrap();
        assert_eq!(
            prs.iter()
                .map(|pr| (pr.pr, pr.last_run.id))
                .collect::<Vec<_>>(),
            [(PrNumber(2), two), (PrNumber(1), one)]
        );
        assert!(prs[0].teardown.is_none());
        let queued = store.runs_with_status(RunStatus::Queued, 10).await.unwrap();
        assert_eq!(
            queued.iter().map(|run| run.id).collect::<Vec<_>>(),
            [one, two]
        );
    }
}
