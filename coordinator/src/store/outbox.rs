//! The outbox, as the publisher reads it: what the scheduling rules need of the active runs,
//! marking a run dispatched once the broker confirmed its job message, and the running runs
//! whose cancel the agents must hear.
//!
//! One word for one moment: a run is *dispatched* when its job message is on the broker (the
//! SQL column keeps its first name, `published`).

use slimci_proto::RunId;

use super::rows::{ACTIVE_RUN_COLUMNS, active_run_from_row};
use super::{Result, Store, corrupt};
use crate::rules;

impl Store {
    /// What the scheduling rules need of every queued and running run, oldest first: only
    /// those columns, so the publisher's every wake stays cheap with a long queue.
    pub async fn active_for_rules(&self) -> Result<Vec<rules::ActiveRun>> {
        let rows = sqlx::query(&format!(
            "SELECT {ACTIVE_RUN_COLUMNS} FROM runs WHERE status IN ('queued', 'running') ORDER BY created_ms, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(active_run_from_row).collect()
    }

    /// Records that the broker confirmed the run's job message.
    pub async fn mark_dispatched(&self, id: RunId) -> Result<()> {
        sqlx::query("UPDATE runs SET published = 1 WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Running runs a user asked to cancel; the publisher tells the agents.
    pub async fn cancel_pending_runs(&self) -> Result<Vec<RunId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM runs WHERE status = 'running' AND cancel_requested = 1",
        )
        .fetch_all(&self.pool)
        .await?;
        ids.iter()
            .map(|id| RunId::parse(id).map_err(corrupt))
            .collect()
    }
}
