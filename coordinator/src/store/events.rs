//! Agent events: where an event stands against its run (`event_disposition`), and applying
//! one in one transaction (`apply_event`), including the `Finished` that ends the run as
//! `rules::decide_finish` says, moving production state for a deploy.

use slimci_proto::{AgentEvent, EventBody, Outcome, RunKind};
use sqlx::{Sqlite, Transaction};

use super::{Result, Run, Store, corrupt, production, runs};
use crate::rules::{self, EventDisposition, Finish, FinishedAttempt, RunStatus};

/// What applying an agent event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub disposition: EventDisposition,
    /// The run reached a terminal status with this event.
    pub finished: Option<RunStatus>,
}

impl Store {
    /// Where an event stands against the run's attempt and sequence, without changing anything.
    pub async fn event_disposition(&self, event: &AgentEvent) -> Result<Option<EventDisposition>> {
        let Some(run) = self.run(event.run_id).await? else {
            return Ok(None);
        };
        Ok(Some(disposition(&run, event)))
    }

    /// Applies an agent event whose log lines (if any) are already on disk.
    pub async fn apply_event(&self, event: &AgentEvent) -> Result<Applied> {
        let mut transaction = self.begin_immediate().await?;
        let run_id = event.run_id.to_string();
        let Some(run) = runs::read_run(&mut *transaction, event.run_id).await? else {
            return Ok(Applied {
                disposition: EventDisposition::StaleAttempt,
                finished: None,
            });
        };
        let disposition = disposition(&run, event);
        if disposition != EventDisposition::Apply {
            return Ok(Applied {
                disposition,
                finished: None,
            });
        }
        let at = event.at.timestamp_millis();
        let attempt = event.attempt.0 as i64;
        let mut finished = None;
        match &event.body {
            EventBody::Started { sha } => {
                sqlx::query("UPDATE runs SET sha = ? WHERE id = ?")
                    .bind(sha.as_str())
                    .bind(&run_id)
                    .execute(&mut *transaction)
                    .await?;
            }
            EventBody::PhaseStarted { phase } => {
                sqlx::query(
                    "INSERT INTO run_phases (run_id, attempt, phase, started_ms) VALUES (?, ?, ?, ?)
                     ON CONFLICT (run_id, attempt, phase) DO UPDATE SET started_ms = excluded.started_ms",
                )
                .bind(&run_id)
                .bind(attempt)
                .bind(phase.as_str())
                .bind(at)
                .execute(&mut *transaction)
                .await?;
            }
            EventBody::PhaseFinished { phase, ok, .. } => {
                sqlx::query(
                    "INSERT INTO run_phases (run_id, attempt, phase, started_ms, finished_ms, ok) VALUES (?, ?, ?, ?, ?, ?)
                     ON CONFLICT (run_id, attempt, phase) DO UPDATE SET finished_ms = excluded.finished_ms, ok = excluded.ok",
                )
                .bind(&run_id)
                .bind(attempt)
                .bind(phase.as_str())
                .bind(at)
                .bind(at)
                .bind(*ok as i64)
                .execute(&mut *transaction)
                .await?;
            }
            EventBody::Progress { done, total } => {
                sqlx::query("UPDATE runs SET progress_done = ?, progress_total = ? WHERE id = ?")
                    .bind(*done as i64)
                    .bind(*total as i64)
                    .bind(&run_id)
                    .execute(&mut *transaction)
                    .await?;
            }
            EventBody::Log { .. } | EventBody::Released { .. } => {}
            EventBody::Sandbox(report) => {
                store_report(&mut transaction, &run_id, Report::Sandbox, report).await?;
            }
            EventBody::Caches(report) => {
                store_report(&mut transaction, &run_id, Report::Caches, report).await?;
            }
            EventBody::Finished(outcome) => {
                finished = Some(finish(&mut transaction, &run, outcome, at).await?);
            }
        }
        sqlx::query("UPDATE runs SET last_seq = ? WHERE id = ?")
            .bind(event.seq as i64)
            .bind(&run_id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(Applied {
            disposition,
            finished,
        })
    }
}

fn disposition(run: &Run, event: &AgentEvent) -> EventDisposition {
    rules::event_disposition(
        run.status,
        run.attempt,
        run.last_seq,
        event.attempt,
        event.seq,
    )
}

/// The agent's reports a run keeps as JSON, each in a column of its own.
enum Report {
    Sandbox,
    Caches,
}

async fn store_report(
    transaction: &mut Transaction<'_, Sqlite>,
    run_id: &str,
    report: Report,
    value: &impl serde::Serialize,
) -> Result<()> {
    let sql = match report {
        Report::Sandbox => "UPDATE runs SET sandbox = ? WHERE id = ?",
        Report::Caches => "UPDATE runs SET caches = ? WHERE id = ?",
    };
    sqlx::query(sql)
        .bind(serde_json::to_string(value).map_err(corrupt)?)
        .bind(run_id)
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

/// Ends `run` with its attempt's outcome, as `rules::decide_finish` says.
async fn finish(
    transaction: &mut Transaction<'_, Sqlite>,
    run: &Run,
    outcome: &Outcome,
    at: i64,
) -> Result<RunStatus> {
    let run_id = run.id.to_string();
    for node in &outcome.nodes {
        sqlx::query(
            "INSERT OR REPLACE INTO run_nodes (run_id, unique_id, resource_type, status, execution_time_s, message, failures, relation, adapter_response)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&run_id)
        .bind(&node.unique_id)
        .bind(&node.resource_type)
        .bind(&node.status)
        .bind(node.execution_time_s)
        .bind(&node.message)
        .bind(node.failures.map(|n| n as i64))
        .bind(&node.relation)
        .bind(
            node.adapter_response
                .as_ref()
                .map(|response| serde_json::Value::Object(response.clone()).to_string()),
        )
        .execute(&mut **transaction)
        .await?;
    }
    if !outcome.deferred.is_empty() {
        sqlx::query("UPDATE runs SET deferred = ? WHERE id = ?")
            .bind(serde_json::to_string(&outcome.deferred).expect("strings serialize"))
            .bind(&run_id)
            .execute(&mut **transaction)
            .await?;
    }
    let manifest_sha256 = match run.kind {
        RunKind::Deploy => production::stored_manifest_sha256(transaction, run.id).await?,
        RunKind::Ci | RunKind::Teardown | RunKind::Publish => None,
    };
    let decision = rules::decide_finish(&FinishedAttempt {
        kind: run.kind,
        result: outcome.result,
        message: outcome.message.as_deref(),
        superseded_by: run.superseded_by,
        sha: run.sha.as_ref(),
        manifest_sha256: manifest_sha256.as_deref(),
    });
    if let Finish::Promote {
        sha,
        manifest_sha256,
        ..
    } = &decision
    {
        production::promote(
            transaction,
            &run.repository,
            run.id,
            sha,
            manifest_sha256,
            at,
        )
        .await?;
    }
    let status = decision.status();
    sqlx::query(
        "UPDATE runs SET status = ?, message = ?, finished_ms = ?, dbt_exit_code = ? WHERE id = ?",
    )
    .bind(status.as_str())
    .bind(decision.message())
    .bind(at.max(run.started_ms.unwrap_or(at)))
    .bind(outcome.dbt_exit_code)
    .bind(&run_id)
    .execute(&mut **transaction)
    .await?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{LEASE, claim, event, finished, new_run, store};
    use super::*;
    use crate::store::ArtifactRecord;
    use slimci_proto::RunResult;

    #[tokio::test]
    async fn a_successful_deploy_becomes_production_state() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Deploy);
        store.insert_run(&run).await.unwrap();
        store.claim(&claim(&run), LEASE).await.unwrap();
        store
            .record_artifact(
                run.id,
                &ArtifactRecord {
                    name: "manifest.json".into(),
                    size: 2,
                    sha256: "cafe".into(),
                    created_ms: 0,
                },
            )
            .await
            .unwrap();
        let applied = store
            .apply_event(&finished(&run, 1, RunResult::Success))
            .await
            .unwrap();
        assert_eq!(applied.finished, Some(RunStatus::Success));
        let state = store
            .production_state(&run.repository)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(state.deploy_run_id, run.id);
        assert_eq!(state.manifest_sha256, "cafe");
    }

    #[tokio::test]
    async fn a_deploy_without_manifest_does_not_change_production_state() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Deploy);
        store.insert_run(&run).await.unwrap();
        store.claim(&claim(&run), LEASE).await.unwrap();
        let applied = store
            .apply_event(&finished(&run, 1, RunResult::Success))
            .await
            .unwrap();
        assert_eq!(applied.finished, Some(RunStatus::Error));
        assert!(
            store
                .production_state(&run.repository)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn the_sandbox_report_is_stored_with_the_run() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        store.claim(&claim(&run), LEASE).await.unwrap();
        let report = slimci_proto::SandboxReport {
            pid_namespace: true,
            cgroup: "v2".into(),
            memory_limit_bytes: Some(1 << 32),
            pids_limit: Some(512),
            landlock: "full".into(),
            landlock_abi: Some(6),
            user: "slimci-build".into(),
            uid: 998,
            rlimit_nofile: 4096,
            rlimit_nproc: Some(512),
            core_dumps: false,
            warnings: vec![],
            prestarted: false,
        };
        store
            .apply_event(&event(&run, 1, EventBody::Sandbox(report.clone())))
            .await
            .unwrap();
        let stored = store.run(run.id).await.unwrap().unwrap().sandbox.unwrap();
        assert_eq!(
            serde_json::from_str::<slimci_proto::SandboxReport>(&stored).unwrap(),
            report
        );
    }

    #[tokio::test]
    async fn duplicate_and_late_events_change_nothing() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        store.claim(&claim(&run), LEASE).await.unwrap();
        let progress = |seq, done| event(&run, seq, EventBody::Progress { done, total: 9 });
        assert_eq!(
            store
                .apply_event(&progress(1, 3))
                .await
                .unwrap()
                .disposition,
            EventDisposition::Apply
        );
        assert_eq!(
            store
                .apply_event(&progress(1, 5))
                .await
                .unwrap()
                .disposition,
            EventDisposition::Duplicate
        );
        assert_eq!(store.run(run.id).await.unwrap().unwrap().progress_done, 3);
        store
            .apply_event(&finished(&run, 2, RunResult::Failed))
            .await
            .unwrap();
        assert_eq!(
            store
                .apply_event(&progress(3, 9))
                .await
                .unwrap()
                .disposition,
            EventDisposition::RunEnded
        );
        assert_eq!(
            store.run(run.id).await.unwrap().unwrap().status,
            RunStatus::Failed
        );
    }
}
