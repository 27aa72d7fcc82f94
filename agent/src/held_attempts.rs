//! `HeldAttempts`: the attempts this agent has taken, each with its cancel token, its lease
//! once the claim is granted, and why the agent stopped it if it lost the lease. The consumer
//! registers and removes them, the heartbeat loop renews and fences them (through
//! `rules::lease_verdict`), the control listener cancels them.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;
use std::time::Duration;

use slimci_proto::{Attempt, HeartbeatResponse, Lease, RunId};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::rules::{self, LeaseClock, LeaseLoss, LeaseVerdict};

/// One attempt this agent holds.
struct HeldAttempt {
    attempt: Attempt,
    cancel: CancellationToken,
    /// None until the claim is granted.
    lease: Option<LeaseClock>,
    /// Set when the agent stopped the build because it no longer holds the lease: the attempt
    /// is then released rather than reported cancelled.
    lease_loss: Option<LeaseLoss>,
}

/// The attempts this agent holds, by run.
#[derive(Default)]
pub struct HeldAttempts {
    attempts: Mutex<HashMap<RunId, HeldAttempt>>,
}

/// The leases to renew in one heartbeat.
pub struct LeasesToRenew {
    pub leases: Vec<Lease>,
    /// The shortest of them, which sets the pace of heartbeats.
    pub shortest: Option<Duration>,
}

impl HeldAttempts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RunId, HeldAttempt>> {
        self.attempts.lock().expect("held attempts lock")
    }

    /// Registers an attempt before its claim, so a cancel right after the grant is not lost.
    /// False (and nothing changed) if this agent already holds the run: a redelivery must not
    /// touch the entry of the build in progress (its claim is refused anyway).
    pub fn register(&self, run_id: RunId, attempt: Attempt, cancel: CancellationToken) -> bool {
        match self.lock().entry(run_id) {
            Entry::Occupied(_) => false,
            Entry::Vacant(entry) => {
                entry.insert(HeldAttempt {
                    attempt,
                    cancel,
                    lease: None,
                    lease_loss: None,
                });
                true
            }
        }
    }

    /// The claim sent at `claim_sent_at` was granted: the lease counts from that instant.
    pub fn granted(&self, run_id: RunId, lease: Duration, claim_sent_at: Instant) {
        if let Some(held) = self.lock().get_mut(&run_id) {
            held.lease = Some(LeaseClock {
                lease,
                renewed_at: claim_sent_at,
            });
        }
    }

    /// The earliest instant at which a build still holding its lease must be stopped unless
    /// renewed (`LeaseClock::fence_at`); the heartbeat loop wakes up then at the latest.
    pub fn earliest_fence(&self) -> Option<Instant> {
        self.lock()
            .values()
            .filter(|held| held.lease_loss.is_none())
            .filter_map(|held| held.lease.map(|clock| clock.fence_at()))
            .min()
    }

    pub fn remove(&self, run_id: RunId) {
        self.lock().remove(&run_id);
    }

    /// Why the agent stopped this run's build, if it lost the lease.
    pub fn lease_loss(&self, run_id: RunId) -> Option<LeaseLoss> {
        self.lock()
            .get(&run_id)
            .and_then(|held| held.lease_loss.clone())
    }

    /// Cancels the run's build if this agent holds it; says whether it did.
    pub fn cancel(&self, run_id: RunId) -> bool {
        match self.lock().get(&run_id) {
            Some(held) => {
                held.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// The leases granted so far.
    pub fn leases_to_renew(&self) -> LeasesToRenew {
        let attempts = self.lock();
        let granted = || {
            attempts
                .iter()
                .filter_map(|(run_id, held)| Some((*run_id, held.attempt, held.lease?)))
        };
        LeasesToRenew {
            leases: granted()
                .map(|(run_id, attempt, _)| Lease { run_id, attempt })
                .collect(),
            shortest: granted().map(|(_, _, clock)| clock.lease).min(),
        }
    }

    /// Applies the answer (`None`: it failed) to a heartbeat sent at `sent_at` about the leases
    /// `sent`, and stops every build whose lease verdict says so.
    pub fn apply_heartbeat(
        &self,
        sent: &[Lease],
        answer: Option<&HeartbeatResponse>,
        sent_at: Instant,
    ) {
        let now = Instant::now();
        let mut attempts = self.lock();
        for (run_id, held) in attempts.iter_mut() {
            let (Some(clock), None) = (held.lease, &held.lease_loss) else {
                continue;
            };
            let lease = Lease {
                run_id: *run_id,
                attempt: held.attempt,
            };
            let said = rules::lease_answer(&lease, sent, answer);
            match rules::lease_verdict(clock, said, sent_at, now) {
                LeaseVerdict::KeepBuilding(clock) => held.lease = Some(clock),
                LeaseVerdict::Stop(loss) => {
                    match &loss {
                        LeaseLoss::NotOurs => {
                            tracing::warn!(run = %run_id, attempt = %held.attempt, "the coordinator says this attempt is not ours any more; stopping it");
                        }
                        LeaseLoss::Unrenewed { unrenewed } => {
                            tracing::warn!(run = %run_id, unrenewed_s = unrenewed.as_secs(), "could not renew the lease for three quarters of it; stopping the build before the coordinator retries it elsewhere");
                        }
                    }
                    held.lease_loss = Some(loss);
                    held.cancel.cancel();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_one(lease: Duration) -> (HeldAttempts, RunId, CancellationToken) {
        let held = HeldAttempts::default();
        let (run_id, cancel) = (RunId::new(), CancellationToken::new());
        assert!(held.register(run_id, Attempt(1), cancel.clone()));
        assert!(held.leases_to_renew().leases.is_empty(), "not granted yet");
        held.granted(run_id, lease, Instant::now());
        (held, run_id, cancel)
    }

    #[tokio::test(start_paused = true)]
    async fn an_unrenewed_build_is_stopped_and_remembers_why() {
        let (held, run_id, cancel) = held_one(Duration::from_secs(4));
        let sent = held.leases_to_renew();
        assert_eq!(sent.shortest, Some(Duration::from_secs(4)));
        tokio::time::advance(Duration::from_secs(2)).await;
        held.apply_heartbeat(&sent.leases, None, Instant::now());
        assert!(!cancel.is_cancelled());
        tokio::time::advance(Duration::from_secs(2)).await;
        held.apply_heartbeat(&sent.leases, None, Instant::now());
        assert!(cancel.is_cancelled());
        assert_eq!(
            held.lease_loss(run_id),
            Some(LeaseLoss::Unrenewed {
                unrenewed: Duration::from_secs(4)
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_keep_a_build_going_and_lost_leases_stop_it() {
        let (held, run_id, cancel) = held_one(Duration::from_secs(4));
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(2)).await;
            let sent = held.leases_to_renew();
            let answer = HeartbeatResponse {
                lease_secs: 4,
                lost: Vec::new(),
            };
            held.apply_heartbeat(&sent.leases, Some(&answer), Instant::now());
        }
        assert!(!cancel.is_cancelled());
        let sent = held.leases_to_renew();
        let answer = HeartbeatResponse {
            lease_secs: 4,
            lost: sent.leases.clone(),
        };
        held.apply_heartbeat(&sent.leases, Some(&answer), Instant::now());
        assert!(cancel.is_cancelled());
        assert_eq!(held.lease_loss(run_id), Some(LeaseLoss::NotOurs));
    }

    #[test]
    fn a_redelivery_does_not_replace_the_running_entry() {
        let (held, run_id, cancel) = held_one(Duration::from_secs(4));
        assert!(!held.register(run_id, Attempt(1), CancellationToken::new()));
        assert!(held.cancel(run_id));
        assert!(cancel.is_cancelled());
        held.remove(run_id);
        assert!(!held.cancel(run_id));
    }
}
