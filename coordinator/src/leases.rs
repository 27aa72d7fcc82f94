//! Runs outlive their agents. A claimed attempt holds a lease that the agent's heartbeats renew;
//! the reaper gives up an attempt whose lease ran out, and an agent that gives an attempt up (it
//! is shutting down) sends `Released`, handled the same way at once. What a lost attempt becomes
//! is `rules::decide_lost_attempt`'s call: the next attempt, or the end of the run (`error` once
//! `max_attempts` attempts were lost: a poison job, whose job message is dead-lettered with the
//! reason).

use std::sync::Arc;
use std::time::Duration;

use slimci_proto::{Attempt, RunId};
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::rules::{LostAttempt, LostReason};
use crate::store::StoreError;

/// How long a claim or a heartbeat keeps an attempt the agent's.
pub fn lease_duration(app: &AppState) -> Duration {
    Duration::from_secs(app.config.reliability.lease_secs)
}

/// Ends attempt `attempt` of `run` without a result and acts on what became of it; none if
/// that attempt was not running any more.
pub async fn give_up_attempt(
    app: &AppState,
    run: RunId,
    attempt: Attempt,
    reason: &LostReason,
) -> Result<Option<LostAttempt>, StoreError> {
    let lost = app
        .store
        .lose_attempt(run, attempt, reason, app.config.reliability.max_attempts)
        .await?;
    if let Some(lost) = &lost
        && state_traced(app)
        && let Ok(Some(run)) = app.store.run(run).await
    {
        let retried = matches!(lost, LostAttempt::Retry { .. });
        // The run already moved on to the next attempt; the lost one is `attempt`.
        let mut lost_run = run;
        lost_run.attempt = attempt;
        crate::telemetry::attempt_lost(app, &lost_run, &reason.to_string(), retried);
    }
    if lost.is_some() {
        let why = match reason {
            LostReason::LeaseExpired { .. } => "expired",
            LostReason::Released { .. } => "released",
        };
        app.metrics.leases_lost.inc(&[why]);
    }
    match &lost {
        None => {}
        Some(LostAttempt::Retry { next, .. }) => {
            tracing::warn!(%run, lost = %attempt, %next, %reason, "attempt lost; retrying");
            app.metrics.retries.inc(&[]);
        }
        Some(LostAttempt::GiveUp { message }) => {
            tracing::error!(%run, attempts = %attempt, %reason, "out of attempts: dead-lettering the job");
            app.dead_jobs
                .lock()
                .expect("dead jobs lock")
                .push((run, message.clone()));
        }
        Some(ended @ (LostAttempt::Superseded { .. } | LostAttempt::Cancelled { .. })) => {
            tracing::info!(%run, status = ended.status().as_str(), %reason, "attempt lost while it was being stopped; ended");
        }
    }
    if lost.is_some() {
        app.outbox.notify_one();
    }
    let _ = app.changes.send(run);
    Ok(lost)
}

fn state_traced(app: &AppState) -> bool {
    app.telemetry.tracer().is_some()
}

/// Every second: attempts whose lease ran out are given up.
pub async fn reaper_loop(app: Arc<AppState>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let expired = match app.store.expired_leases().await {
            Ok(expired) => expired,
            Err(error) => {
                tracing::error!(%error, "cannot read expired leases");
                continue;
            }
        };
        for run in expired {
            let reason = LostReason::LeaseExpired {
                agent: run.agent.clone(),
                lease_secs: app.config.reliability.lease_secs,
            };
            if let Err(error) = give_up_attempt(&app, run.id, run.attempt, &reason).await {
                tracing::error!(%error, run = %run.id, "cannot retry an expired attempt");
            }
        }
    }
}
