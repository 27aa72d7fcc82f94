//! Runs outlive their agents. A claimed attempt holds a lease that the agent's heartbeats renew;
//! the reaper retries an attempt whose lease ran out as the next attempt, or ends the run
//! `error` once `max_attempts` attempts were lost (a poison job: its job message is
//! dead-lettered with the reason). An agent that gives an attempt up (it is shutting down) sends
//! `Released`, handled the same way at once.

use std::sync::Arc;
use std::time::Duration;

use slimci_proto::{Attempt, RunId};
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::rules::RunStatus;
use crate::store::{Retry, StoreError};

pub fn lease_ms(state: &AppState) -> i64 {
    (state.config.reliability.lease_secs as i64) * 1000
}

/// Ends attempt `attempt` of `run` without a result and acts on what the store decided.
pub async fn give_up_attempt(
    state: &AppState,
    run: RunId,
    attempt: Attempt,
    reason: &str,
) -> Result<Retry, StoreError> {
    let retry = state
        .store
        .retry_attempt(run, attempt, reason, state.config.reliability.max_attempts)
        .await?;
    match retry {
        Retry::NotRunning => {}
        Retry::Retried(next) => {
            tracing::warn!(%run, lost = %attempt, next = %next, %reason, "attempt lost; retrying");
            state.outbox.notify_one();
        }
        Retry::Ended(RunStatus::Error) => {
            tracing::error!(%run, attempts = %attempt, %reason, "out of attempts: dead-lettering the job");
            state.dead_jobs.lock().expect("dead jobs lock").push((
                run,
                format!("gave up after {attempt} attempts; the last: {reason}"),
            ));
            state.outbox.notify_one();
        }
        Retry::Ended(status) => {
            tracing::info!(%run, status = status.as_str(), %reason, "attempt lost while it was being stopped; ended");
            state.outbox.notify_one();
        }
    }
    let _ = state.changes.send(run);
    Ok(retry)
}

/// Every second: attempts whose lease ran out are given up.
pub async fn reaper_loop(state: Arc<AppState>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let expired = match state.store.expired_leases().await {
            Ok(expired) => expired,
            Err(error) => {
                tracing::error!(%error, "cannot read expired leases");
                continue;
            }
        };
        for run in expired {
            let reason = format!(
                "its agent {} sent no heartbeat for {} s (it died, or lost the coordinator)",
                run.agent.as_deref().unwrap_or("?"),
                state.config.reliability.lease_secs
            );
            if let Err(error) = give_up_attempt(&state, run.id, run.attempt, &reason).await {
                tracing::error!(%error, run = %run.id, "cannot retry an expired attempt");
            }
        }
    }
}
