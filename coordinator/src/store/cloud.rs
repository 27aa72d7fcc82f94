//! Runs routed between the fleet and dbt Cloud: the routing decision, recorded on the run; a
//! run routed to dbt Cloud is claimed by the coordinator itself (agent [`DBT_CLOUD_AGENT`]),
//! which follows the Cloud run and applies what it sees as that agent's events. Such a run has
//! no lease: the reaper leaves it alone (`leases_expired_at`), since only dbt Cloud's word may
//! end it.

use slimci_proto::{Attempt, RunId};

use super::rows::run_from_row;
use super::{Result, Store, now_ms};
use crate::store::Run;

/// The agent name a run built by dbt Cloud is held by.
pub const DBT_CLOUD_AGENT: &str = "dbt-cloud";

impl Store {
    /// Records that a queued run builds on the fleet, and why. False if it is no longer queued.
    pub async fn route_to_fleet(&self, id: RunId, reason: &str) -> Result<bool> {
        let updated = sqlx::query(
            "UPDATE runs SET backend = 'fleet', backend_reason = ? WHERE id = ? AND status = 'queued' AND published = 0",
        )
        .bind(reason)
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// Routes attempt `attempt` of a queued run to dbt Cloud: it is running from now, held by
    /// [`DBT_CLOUD_AGENT`], and out (dispatched), so its isolation stays busy until it ends.
    /// False if it is no longer that queued attempt, or a cancel came first.
    pub async fn route_to_cloud(&self, id: RunId, attempt: Attempt, reason: &str) -> Result<bool> {
        let updated = sqlx::query(
            "UPDATE runs SET backend = 'dbt_cloud', backend_reason = ?, status = 'running', agent = ?,
                 started_ms = ?, lease_expires_ms = NULL, published = 1
             WHERE id = ? AND attempt = ? AND status = 'queued' AND published = 0 AND cancel_requested = 0",
        )
        .bind(reason)
        .bind(DBT_CLOUD_AGENT)
        .bind(now_ms())
        .bind(id.to_string())
        .bind(attempt.0 as i64)
        .execute(&self.pool)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    /// The dbt Cloud run that builds `id`, once triggered (or found again).
    pub async fn set_dbt_cloud_run(&self, id: RunId, cloud_run: u64) -> Result<()> {
        sqlx::query("UPDATE runs SET dbt_cloud_run_id = ? WHERE id = ?")
            .bind(cloud_run as i64)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The runs dbt Cloud is building for us, oldest first.
    pub async fn cloud_runs_in_flight(&self) -> Result<Vec<Run>> {
        let rows = sqlx::query(
            "SELECT * FROM runs WHERE backend = 'dbt_cloud' AND status = 'running' ORDER BY created_ms, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }
}
