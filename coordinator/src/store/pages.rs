//! What the web pages read and the API does not: runs filtered by pull request, node counts of
//! many runs at once, the nodes a run's page lists, a repository's pull requests with their
//! last run, its teardowns, and the runs that hold or wait for the fleet. Read-only.

use std::collections::HashMap;

use slimci_proto::{NodeResult, PrNumber, RepoName, RunId};
use sqlx::Row;

use super::rows::{node_from_row, pull_request_from_row, run_from_row};
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

/// Which of a run's nodes its page lists.
#[derive(Debug, Clone, Default)]
pub struct NodeFilter {
    /// A part of the node's unique id, in any case (ASCII letters fold, as SQLite's `lower`
    /// folds them); empty for any node.
    pub name_part: String,
    /// A dbt status, `failures` for any of `slimci_client::FAILURE_STATUSES`, or empty for any.
    pub status: String,
    /// At most this many nodes; `None` for all.
    pub limit: Option<u32>,
}

/// The nodes a run's page lists.
#[derive(Debug, Clone, Default)]
pub struct NodePage {
    /// Failures first, then the slowest; nodes that tie in the order they were recorded.
    pub nodes: Vec<NodeResult>,
    /// How many nodes match the filter, listed or not.
    pub matching: u64,
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

    /// Run `id`'s nodes that match `filter`, sorted and cut in SQLite, so that a page of a
    /// build of thousands of nodes reads the hundred it shows rather than all of them.
    pub async fn page_nodes(&self, id: RunId, filter: &NodeFilter) -> Result<NodePage> {
        let failure_statuses =
            serde_json::to_string(&slimci_client::FAILURE_STATUSES).expect("strings serialize");
        let rows = sqlx::query(
            "SELECT *, count(*) OVER () AS matching FROM run_nodes
             WHERE run_id = ?1
               AND (?2 = '' OR instr(lower(unique_id), lower(?2)) > 0)
               AND (?3 = ''
                    OR (?3 = 'failures' AND status IN (SELECT value FROM json_each(?4)))
                    OR (?3 <> 'failures' AND status = ?3))
             ORDER BY status IN (SELECT value FROM json_each(?4)) DESC, execution_time_s DESC, rowid
             LIMIT ?5",
        )
        .bind(id.to_string())
        .bind(&filter.name_part)
        .bind(&filter.status)
        .bind(failure_statuses)
        .bind(filter.limit.map_or(-1, i64::from))
        .fetch_all(&self.pool)
        .await?;
        let matching = match rows.first() {
            Some(row) => u64::try_from(row.try_get::<i64, _>("matching")?).unwrap_or_default(),
            None => 0,
        };
        Ok(NodePage {
            nodes: rows.iter().map(node_from_row).collect::<Result<_>>()?,
            matching,
        })
    }

    /// The repository's pull requests that have CI runs, the most recently built first, at
    /// most `limit`.
    pub async fn pull_requests_with_runs(
        &self,
        repository: &RepoName,
        limit: u32,
    ) -> Result<Vec<PullRequestRuns>> {
        // Two runs can be created in one millisecond; run ids are UUIDv7, increasing within
        // the coordinator, so the newer id breaks the tie.
        let prs: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT pr_number, count(*) FROM runs
             WHERE repository = ? AND kind = 'ci' AND pr_number IS NOT NULL
             GROUP BY pr_number ORDER BY max(created_ms) DESC, max(id) DESC LIMIT ?",
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

    async fn node(store: &Store, run: RunId, unique_id: &str, status: &str, seconds: f64) {
        sqlx::query(
            "INSERT INTO run_nodes (run_id, unique_id, resource_type, status, execution_time_s)
             VALUES (?, ?, 'model', ?, ?)",
        )
        .bind(run.to_string())
        .bind(unique_id)
        .bind(status)
        .bind(seconds)
        .execute(&store.pool)
        .await
        .unwrap();
    }

    async fn listed(store: &Store, run: RunId, filter: NodeFilter) -> (Vec<String>, u64) {
        let page = store.page_nodes(run, &filter).await.unwrap();
        let names = page.nodes.into_iter().map(|node| node.unique_id).collect();
        (names, page.matching)
    }

    #[tokio::test]
    async fn a_runs_page_lists_failures_first_then_the_slowest_filtered_and_cut() {
        let (_dir, store) = store().await;
        let run = ci_run(&store, 1).await;
        node(&store, run, "model.shop.fast", "success", 0.1).await;
        node(&store, run, "model.shop.slow", "success", 9.0).await;
        node(&store, run, "test.shop.Not_Null", "fail", 0.2).await;
        node(&store, run, "model.shop.tie_a", "success", 1.0).await;
        node(&store, run, "model.shop.tie_b", "success", 1.0).await;
        node(&store, run, "model.shop.broken", "error", 0.0).await;
        node(&store, run, "seed.shop.skipped", "skipped", 0.0).await;
        // The order the page used to sort in memory: failures first, then the slowest, ties
        // as recorded.
        assert_eq!(
            listed(&store, run, NodeFilter::default()).await,
            (
                [
                    "test.shop.Not_Null",
                    "model.shop.broken",
                    "model.shop.slow",
                    "model.shop.tie_a",
                    "model.shop.tie_b",
                    "model.shop.fast",
                    "seed.shop.skipped",
                ]
                .map(str::to_owned)
                .to_vec(),
                7
            )
        );
        let cut = NodeFilter {
            limit: Some(2),
            ..NodeFilter::default()
        };
        assert_eq!(
            listed(&store, run, cut).await.1,
            7,
            "counted before the cut"
        );
        let failures = NodeFilter {
            status: "failures".to_owned(),
            ..NodeFilter::default()
        };
        assert_eq!(listed(&store, run, failures).await.1, 2);
        let skipped = NodeFilter {
            status: "skipped".to_owned(),
            ..NodeFilter::default()
        };
        assert_eq!(
            listed(&store, run, skipped).await,
            (vec!["seed.shop.skipped".to_owned()], 1)
        );
        let by_name = NodeFilter {
            name_part: "NOT_null".to_owned(),
            ..NodeFilter::default()
        };
        assert_eq!(
            listed(&store, run, by_name).await,
            (vec!["test.shop.Not_Null".to_owned()], 1)
        );
        let nothing = NodeFilter {
            name_part: "nowhere".to_owned(),
            ..NodeFilter::default()
        };
        assert_eq!(listed(&store, run, nothing).await, (vec![], 0));
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
