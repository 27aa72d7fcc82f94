//! Fixtures shared by the store's unit tests: a store in a temporary directory, runs, events,
//! claims and outcomes.

use std::time::Duration;

use chrono::Utc;
use slimci_proto::{
    AgentEvent, AgentName, Attempt, ClaimRequest, EventBody, IsolationName, Outcome, PrNumber,
    RepoName, RunId, RunKind, RunResult, Sha,
};

use super::{NewRun, Store};
use crate::rules::RunStatus;

/// A lease long enough for any test.
pub const LEASE: Duration = Duration::from_secs(60);

pub async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    (dir, store)
}

/// Renames table `from` to `to`: with a table away, every query of it fails as a broken
/// database would.
pub async fn rename_table(store: &Store, from: &str, to: &str) {
    sqlx::raw_sql(&format!("ALTER TABLE {from} RENAME TO {to}"))
        .execute(&store.pool)
        .await
        .unwrap();
}

pub fn new_run(kind: RunKind) -> NewRun {
    let repository = RepoName::parse("shop").unwrap();
    NewRun {
        id: RunId::new(),
        kind,
        pr: (kind == RunKind::Ci).then_some(PrNumber(4)),
        sha: Some(Sha::parse(&"ab".repeat(20)).unwrap()),
        fetch_ref: "refs/heads/main".into(),
        isolation: (kind == RunKind::Ci).then(|| IsolationName::for_pr(&repository, PrNumber(4))),
        repository,
        timeout_secs: 60,
        production_state: None,
        status: RunStatus::Queued,
        message: None,
        traceparent: None,
        trigger: slimci_client::Trigger::Api { user_agent: None },
    }
}

pub fn event(run: &NewRun, seq: u64, body: EventBody) -> AgentEvent {
    AgentEvent {
        run_id: run.id,
        attempt: Attempt(1),
        agent: AgentName::parse("a1").unwrap(),
        seq,
        at: Utc::now(),
        body,
    }
}

/// The `Finished` event of attempt 1 with `result` (dbt's exit code to match).
pub fn finished(run: &NewRun, seq: u64, result: RunResult) -> AgentEvent {
    let outcome = Outcome {
        result,
        message: None,
        dbt_exit_code: Some(match result {
            RunResult::Success => 0,
            _ => 1,
        }),
        nodes: vec![],
        deferred: vec![],
        usage: None,
    };
    event(run, seq, EventBody::Finished(outcome))
}

pub fn claim(run: &NewRun) -> ClaimRequest {
    ClaimRequest {
        run_id: run.id,
        attempt: Attempt(1),
        agent: AgentName::parse("a1").unwrap(),
    }
}
