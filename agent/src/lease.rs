//! The heartbeat loop: renews the leases of the attempts this agent holds, every third of the
//! shortest lease, and applies the coordinator's answer through `HeldAttempts` (which stops a
//! build the coordinator says is not ours, or that could not be renewed for three quarters of
//! its lease: by then the coordinator may hand it to another agent, and two attempts of one run
//! must never build at once).

use std::sync::Arc;

use crate::coordinator_client::CoordinatorClient;
use crate::held_attempts::HeldAttempts;
use crate::rules;

/// Runs until aborted.
pub async fn heartbeat_loop(held: Arc<HeldAttempts>, coordinator: CoordinatorClient) {
    loop {
        let renew = held.leases_to_renew();
        if !renew.leases.is_empty() {
            let answer = match coordinator.heartbeat(renew.leases.clone()).await {
                Ok(answer) => Some(answer),
                Err(error) => {
                    tracing::warn!(%error, "heartbeat failed; leases not renewed");
                    None
                }
            };
            held.apply_heartbeat(&renew.leases, answer.as_ref());
        }
        tokio::time::sleep(rules::heartbeat_interval(renew.shortest)).await;
    }
}
