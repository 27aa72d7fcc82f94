//! The heartbeat loop: renews the leases of the attempts this agent holds, every third of the
//! shortest lease, and applies the coordinator's answer through `HeldAttempts` (which stops a
//! build the coordinator says is not ours, or that could not be renewed for three quarters of
//! its lease: by then the coordinator may hand it to another agent, and two attempts of one run
//! must never build at once). The fence does not wait for the coordinator: a heartbeat that
//! has not answered by the earliest fence counts as failed, and the loop wakes up at that
//! fence even between heartbeats.
//!
//! Every heartbeat also says what the agent is (`AgentStatus`: version, slots, busy, draining),
//! and an idle agent sends one every `REGISTER_EVERY` with no leases, so the coordinator's
//! fleet view knows it is there.

use std::sync::Arc;
use std::time::Duration;

use slimci_proto::AgentStatus;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::coordinator_client::CoordinatorClient;
use crate::held_attempts::HeldAttempts;
use crate::rules;

/// The longest an agent stays silent: the coordinator counts it offline after three of these
/// (`slimci_coordinator::agents::OFFLINE_AFTER`).
pub const REGISTER_EVERY: Duration = Duration::from_secs(10);

/// What every heartbeat says of the agent besides its leases.
#[derive(Clone)]
pub struct Presence {
    pub slots: u16,
    /// Fires when the agent starts draining.
    pub draining: CancellationToken,
}

impl Presence {
    pub fn status(&self, busy: usize) -> AgentStatus {
        AgentStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            slots: self.slots,
            busy: u16::try_from(busy).unwrap_or(u16::MAX),
            draining: self.draining.is_cancelled(),
        }
    }
}

/// Runs until aborted.
pub async fn heartbeat_loop(
    held: Arc<HeldAttempts>,
    coordinator: CoordinatorClient,
    presence: Presence,
) {
    let mut told_draining = false;
    loop {
        let renew = held.leases_to_renew();
        let status = presence.status(renew.leases.len());
        told_draining |= status.draining;
        if renew.leases.is_empty() {
            // Only to be seen: a failure costs nothing but the fleet view, and the coordinator
            // may well be restarting.
            if let Err(error) = coordinator.heartbeat(Vec::new(), status).await {
                tracing::debug!(%error, "idle heartbeat failed");
            }
        } else {
            let sent_at = Instant::now();
            let heartbeat = coordinator.heartbeat(renew.leases.clone(), status);
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
        let now = Instant::now();
        let wake = rules::next_heartbeat_wake(
            now,
            rules::heartbeat_interval(renew.shortest),
            held.earliest_fence(),
        )
        .min(now + REGISTER_EVERY);
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            // Say at once that this agent drains.
            () = presence.draining.cancelled(), if !told_draining => {}
        }
    }
}
