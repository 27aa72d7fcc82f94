//! The heartbeat loop: renews the leases of the attempts this agent holds, every third of the
//! shortest lease, and applies the coordinator's answer through `HeldAttempts` (which stops a
//! build the coordinator says is not ours, or that could not be renewed for three quarters of
//! its lease: by then the coordinator may hand it to another agent, and two attempts of one run
//! must never build at once). The fence does not wait for the coordinator: a heartbeat that
//! has not answered by the earliest fence counts as failed, and the loop wakes up at that
//! fence even between heartbeats.

use std::sync::Arc;

use tokio::time::Instant;

use crate::coordinator_client::CoordinatorClient;
use crate::held_attempts::HeldAttempts;
use crate::rules;

/// Runs until aborted.
pub async fn heartbeat_loop(held: Arc<HeldAttempts>, coordinator: CoordinatorClient) {
    loop {
        let renew = held.leases_to_renew();
        if !renew.leases.is_empty() {
            let sent_at = Instant::now();
            let heartbeat = coordinator.heartbeat(renew.leases.clone());
            let answered = match held.earliest_fence() {
                Some(fence) => tokio::time::timeout_at(fence, heartbeat).await.ok(),
                None => Some(heartbeat.await),
            };
            let answer = match answered {
                Some(Ok(answer)) => Some(answer),
                Some(Err(error)) => {
                    tracing::warn!(%error, "heartbeat failed; leases not renewed");
                    None
                }
                None => {
                    tracing::warn!(
                        "heartbeat not answered before a lease's fence; leases not renewed"
                    );
                    None
                }
            };
            held.apply_heartbeat(&renew.leases, answer.as_ref(), sent_at);
        }
        let wake = rules::next_heartbeat_wake(
            Instant::now(),
            rules::heartbeat_interval(renew.shortest),
            held.earliest_fence(),
        );
        tokio::time::sleep_until(wake).await;
    }
}
