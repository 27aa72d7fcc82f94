//! Claims and leases: the claim fence (one claim per attempt wins), renewing and extending
//! leases, the attempts whose lease ran out, and ending a lost attempt as
//! `rules::decide_lost_attempt` says (retry it, or end the run).

use std::time::Duration;

use slimci_proto::{Attempt, ClaimRequest, Lease, RunId};

use super::rows::run_from_row;
use super::{Result, Run, Store, now_ms};
use crate::rules::{self, ClaimDecision, ClaimView, LostAttempt, LostAttemptView, LostReason};

/// When a lease of length `lease` taken now runs out.
fn expires_ms(lease: Duration) -> i64 {
    now_ms().saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
}

impl Store {
    /// Grants or refuses an agent's claim, atomically: at most one claim of an attempt wins. A
    /// granted claim holds a lease of length `lease`.
    pub async fn claim(&self, claim: &ClaimRequest, lease: Duration) -> Result<ClaimDecision> {
        let view = self.run(claim.run_id).await?.map(|run| ClaimView {
            status: run.status,
            attempt: run.attempt,
            agent: run.agent,
        });
        if let refused @ ClaimDecision::Refuse(_) = rules::decide_claim(view.as_ref(), claim) {
            return Ok(refused);
        }
        let updated = sqlx::query(
            "UPDATE runs SET status = 'running', agent = ?, started_ms = ?, lease_expires_ms = ?
             WHERE id = ? AND attempt = ? AND status = 'queued'",
        )
        .bind(claim.agent.as_str())
        .bind(now_ms())
        .bind(expires_ms(lease))
        .bind(claim.run_id.to_string())
        .bind(claim.attempt.0 as i64)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 1 {
            Ok(ClaimDecision::Grant)
        } else {
            Ok(ClaimDecision::lost_race())
        }
    }

    /// Renews the leases `agent` holds; returns the ones it does not hold any more.
    pub async fn renew_leases(
        &self,
        agent: &str,
        leases: &[Lease],
        lease: Duration,
    ) -> Result<Vec<Lease>> {
        let mut lost = Vec::new();
        for held in leases {
            let renewed = sqlx::query(
                "UPDATE runs SET lease_expires_ms = ? WHERE id = ? AND attempt = ? AND agent = ? AND status = 'running'",
            )
            .bind(expires_ms(lease))
            .bind(held.run_id.to_string())
            .bind(held.attempt.0 as i64)
            .bind(agent)
            .execute(&self.pool)
            .await?;
            if renewed.rows_affected() == 0 {
                lost.push(*held);
            }
        }
        Ok(lost)
    }

    /// After a coordinator restart: every running attempt gets a full lease again, so agents
    /// that could not reach us meanwhile are not taken for dead.
    pub async fn extend_all_leases(&self, lease: Duration) -> Result<u64> {
        let extended = sqlx::query("UPDATE runs SET lease_expires_ms = ? WHERE status = 'running'")
            .bind(expires_ms(lease))
            .execute(&self.pool)
            .await?;
        Ok(extended.rows_affected())
    }

    /// Running attempts whose lease ran out.
    pub async fn expired_leases(&self) -> Result<Vec<Run>> {
        self.leases_expired_at(now_ms()).await
    }

    /// Running attempts whose lease ran out before `at_ms`. Runs dbt Cloud builds have no
    /// lease to lose: the coordinator itself follows them, and ends them only on dbt Cloud's
    /// word (`dbt_cloud::mirror`).
    async fn leases_expired_at(&self, at_ms: i64) -> Result<Vec<Run>> {
        let rows =
            sqlx::query("SELECT * FROM runs WHERE status = 'running' AND lease_expires_ms < ? AND backend IS NOT 'dbt_cloud'")
                .bind(at_ms)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(run_from_row).collect()
    }

    /// Ends attempt `attempt` of a running run without a result (its agent died or gave it
    /// up), as `rules::decide_lost_attempt` says: the run is queued again as the next attempt,
    /// or ends. None if that attempt was not running (already retried or ended).
    pub async fn lose_attempt(
        &self,
        id: RunId,
        attempt: Attempt,
        reason: &LostReason,
        max_attempts: u32,
    ) -> Result<Option<LostAttempt>> {
        let mut transaction = self.begin_immediate().await?;
        let row =
            sqlx::query("SELECT * FROM runs WHERE id = ? AND attempt = ? AND status = 'running'")
                .bind(id.to_string())
                .bind(attempt.0 as i64)
                .fetch_optional(&mut *transaction)
                .await?;
        let Some(run) = row.as_ref().map(run_from_row).transpose()? else {
            return Ok(None);
        };
        let view = LostAttemptView {
            attempt: run.attempt,
            superseded_by: run.superseded_by,
            cancel_requested: run.cancel_requested,
        };
        let decision = rules::decide_lost_attempt(&view, reason, max_attempts);
        if let LostAttempt::Retry { next, message } = &decision {
            sqlx::query(
                "UPDATE runs SET attempt = ?, status = 'queued', queued_ms = ?, published = 0, agent = NULL, started_ms = NULL,
                    lease_expires_ms = NULL, last_seq = 0, progress_done = 0, progress_total = 0, message = ?
                 WHERE id = ?",
            )
            .bind(next.0 as i64)
            .bind(now_ms())
            .bind(message)
            .bind(id.to_string())
            .execute(&mut *transaction)
            .await?;
        } else {
            sqlx::query("UPDATE runs SET status = ?, message = ?, finished_ms = ?, lease_expires_ms = NULL WHERE id = ?")
                .bind(decision.status().as_str())
                .bind(decision.message())
                .bind(now_ms())
                .bind(id.to_string())
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(Some(decision))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{LEASE, claim, new_run, store};
    use super::*;
    use crate::rules::RunStatus;
    use slimci_proto::{AgentName, RunKind};

    fn died() -> LostReason {
        LostReason::Released {
            agent: AgentName::parse("a1").unwrap(),
            reason: "shutting down".into(),
        }
    }

    #[tokio::test]
    async fn a_run_dbt_cloud_builds_has_no_lease_to_lose() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        assert!(
            store
                .route_to_cloud(run.id, Attempt(1), "cloud_first")
                .await
                .unwrap()
        );
        // A coordinator's start gives every running run a full lease; a Cloud run's is never
        // taken for lost, however long dbt Cloud builds.
        store.extend_all_leases(LEASE).await.unwrap();
        let far = store.leases_expired_at(now_ms() + 3_600_000).await.unwrap();
        assert!(far.is_empty(), "{far:?}");
        let held = store.run(run.id).await.unwrap().unwrap();
        assert_eq!(
            (held.status, held.agent.as_deref(), held.dispatched),
            (
                RunStatus::Running,
                Some(crate::store::DBT_CLOUD_AGENT),
                true
            )
        );
        // Routed once: the router cannot route it again, to either side.
        assert!(
            !store
                .route_to_cloud(run.id, Attempt(1), "again")
                .await
                .unwrap()
        );
        assert!(!store.route_to_fleet(run.id, "again").await.unwrap());
    }

    #[tokio::test]
    async fn a_retried_run_waits_in_the_queue_since_its_retry_not_its_request() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        let hour_ago = now_ms() - 3_600_000;
        sqlx::query("UPDATE runs SET created_ms = ?1, queued_ms = ?1 WHERE id = ?2")
            .bind(hour_ago)
            .bind(run.id.to_string())
            .execute(&store.pool)
            .await
            .unwrap();
        let queue = store.queue_by_repository().await.unwrap();
        assert_eq!(queue, vec![("shop".to_owned(), 1, hour_ago)]);
        store.claim(&claim(&run), LEASE).await.unwrap();
        assert!(store.queue_by_repository().await.unwrap().is_empty());
        let lost_at = now_ms();
        let retried = store
            .lose_attempt(run.id, Attempt(1), &died(), 2)
            .await
            .unwrap();
        assert!(
            matches!(retried, Some(LostAttempt::Retry { .. })),
            "{retried:?}"
        );
        let queue = store.queue_by_repository().await.unwrap();
        assert_eq!(queue.len(), 1, "{queue:?}");
        assert!(
            queue[0].2 >= lost_at,
            "the oldest wait starts at the retry ({lost_at}), not the request: {queue:?}"
        );
        let stored = store.run(run.id).await.unwrap().unwrap();
        assert_eq!(
            (stored.created_ms, stored.queued_ms),
            (hour_ago, queue[0].2)
        );
    }

    #[tokio::test]
    async fn a_lost_attempt_is_retried_then_given_up() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        store.claim(&claim(&run), LEASE).await.unwrap();
        assert!(store.expired_leases().await.unwrap().is_empty());
        let expired = store.leases_expired_at(now_ms() + 61_000).await.unwrap();
        assert_eq!(expired.len(), 1, "a lease in the past has expired");
        let retried = store
            .lose_attempt(run.id, Attempt(1), &died(), 2)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(
                retried,
                LostAttempt::Retry {
                    next: Attempt(2),
                    ..
                }
            ),
            "{retried:?}"
        );
        let retried = store.run(run.id).await.unwrap().unwrap();
        assert_eq!(
            (retried.status, retried.attempt, retried.dispatched),
            (RunStatus::Queued, Attempt(2), false)
        );
        assert_eq!(
            store
                .lose_attempt(run.id, Attempt(1), &died(), 2)
                .await
                .unwrap(),
            None,
            "the old attempt is fenced"
        );
        let second = ClaimRequest {
            attempt: Attempt(2),
            ..claim(&run)
        };
        assert_eq!(
            store.claim(&second, LEASE).await.unwrap(),
            ClaimDecision::Grant
        );
        let lease = |attempt| Lease {
            run_id: run.id,
            attempt: Attempt(attempt),
        };
        let lost = store.renew_leases("a1", &[lease(1)], LEASE).await.unwrap();
        assert_eq!(
            lost.len(),
            1,
            "the agent is told attempt 1 is not its any more"
        );
        assert!(
            store
                .renew_leases("a1", &[lease(2)], LEASE)
                .await
                .unwrap()
                .is_empty()
        );
        let given_up = store
            .lose_attempt(run.id, Attempt(2), &died(), 2)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(given_up.status(), RunStatus::Error);
        let ended = store.run(run.id).await.unwrap().unwrap();
        assert_eq!(ended.status, RunStatus::Error);
        assert_eq!(ended.message.as_deref(), Some(given_up.message()));
        assert!(given_up.message().contains("gave up after 2 attempts"));
    }

    #[tokio::test]
    async fn only_one_claim_wins() {
        let (_dir, store) = store().await;
        let run = new_run(RunKind::Ci);
        store.insert_run(&run).await.unwrap();
        assert_eq!(
            store.claim(&claim(&run), LEASE).await.unwrap(),
            ClaimDecision::Grant
        );
        assert_eq!(
            store.claim(&claim(&run), LEASE).await.unwrap(),
            ClaimDecision::Refuse("already claimed by a1".into())
        );
    }
}
