//! The agent's decisions about an attempt's fate, as plain functions over plain data (no I/O,
//! no clock of their own: the caller passes `now`): what becomes of a job message once its
//! claim was asked for (`after_claim`), whether a build still holds its lease (`lease_answer`,
//! `lease_verdict`, and how often to renew, `heartbeat_interval`), and whether a stopped
//! attempt is released for a retry or reported finished (`attempt_end`).

use std::fmt;
use std::time::Duration;

use slimci_proto::{ClaimResponse, HeartbeatResponse, Lease, RunResult};
use tokio::time::Instant;

/// What becomes of a job message after the agent asked to claim its run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterClaim {
    /// The claim request itself failed (no answer, an HTTP error, an answer that is not a
    /// protocol message): the message goes back to the queue for another try.
    Requeue,
    /// The coordinator refused (cancelled while queued, already claimed): acknowledged and
    /// dropped, with the coordinator's reason when it gave one.
    Drop { reason: Option<String> },
    /// Granted: acknowledged, and built under a lease of this length.
    Build { lease: Duration },
}

/// How the broker is told about a job message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done with it: the claim is the durable record now.
    Ack,
    /// Back to the queue, for this or another agent.
    Requeue,
}

impl AfterClaim {
    pub fn settle(&self) -> Settle {
        match self {
            AfterClaim::Requeue => Settle::Requeue,
            AfterClaim::Drop { .. } | AfterClaim::Build { .. } => Settle::Ack,
        }
    }
}

/// The decision after a claim: `answer` is the coordinator's answer, or `None` when the request
/// failed. From a granted claim on, the lease, not the message, keeps the run alive.
pub fn after_claim(answer: Option<&ClaimResponse>) -> AfterClaim {
    match answer {
        None => AfterClaim::Requeue,
        Some(claim) if !claim.granted => AfterClaim::Drop {
            reason: claim.reason.clone(),
        },
        Some(claim) => AfterClaim::Build {
            lease: lease_length(claim.lease_secs),
        },
    }
}

/// A lease of `lease_secs` from the coordinator; an answer without one (protocol 1 allows it)
/// counts as the shortest lease, one second.
pub fn lease_length(lease_secs: u64) -> Duration {
    Duration::from_secs(lease_secs.max(1))
}

/// A lease the agent holds: how long it is, and when it was last renewed (or granted), counted
/// from when the agent *sent* the request that renewed it. The coordinator renewed it later
/// than that, so the agent's clock never runs behind the coordinator's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseClock {
    pub lease: Duration,
    pub renewed_at: Instant,
}

impl LeaseClock {
    /// When a build that has not been renewed since must stop: three quarters into the lease,
    /// leaving the last quarter for stopping its process tree before the coordinator may retry
    /// the attempt elsewhere.
    pub fn fence_at(&self) -> Instant {
        self.renewed_at + self.lease * 3 / 4
    }
}

/// What the last heartbeat said about one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAnswer {
    /// Renewed: the lease now runs `lease_secs` from now.
    Renewed { lease_secs: u64 },
    /// The coordinator says the attempt is not this agent's any more.
    NotOurs,
    /// No word about it: the heartbeat failed, or the lease was not in it.
    NoAnswer,
}

/// What a heartbeat (`None`: it failed) that carried the leases `sent` said about `lease`.
pub fn lease_answer(
    lease: &Lease,
    sent: &[Lease],
    answer: Option<&HeartbeatResponse>,
) -> LeaseAnswer {
    match answer {
        Some(answer) if sent.contains(lease) => {
            if answer.lost.contains(lease) {
                LeaseAnswer::NotOurs
            } else {
                LeaseAnswer::Renewed {
                    lease_secs: answer.lease_secs,
                }
            }
        }
        _ => LeaseAnswer::NoAnswer,
    }
}

/// Whether a build may go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseVerdict {
    /// Keep building under this (perhaps renewed) lease.
    KeepBuilding(LeaseClock),
    /// Stop the build: the coordinator may hand the attempt, or already handed it, to another
    /// agent, and two attempts of one run must never build at once.
    Stop(LeaseLoss),
}

/// Why the agent stopped a build whose lease it no longer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseLoss {
    /// The coordinator says the attempt is not ours any more.
    NotOurs,
    /// No renewal for three quarters of the lease, for this long.
    Unrenewed { unrenewed: Duration },
}

impl fmt::Display for LeaseLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseLoss::NotOurs => {
                f.write_str("the coordinator no longer counts this attempt as ours")
            }
            LeaseLoss::Unrenewed { unrenewed } => write!(
                f,
                "the agent could not renew its lease for {} s",
                unrenewed.as_secs()
            ),
        }
    }
}

/// The lease verdict for one build, given its lease, the coordinator's answer to a heartbeat
/// sent at `sent_at`, and the time. A renewal counts from `sent_at`. A build that could not be
/// renewed for three quarters of its lease is stopped before the coordinator may retry it
/// elsewhere (the rest of the lease covers stopping the tree).
pub fn lease_verdict(
    clock: LeaseClock,
    answer: LeaseAnswer,
    sent_at: Instant,
    now: Instant,
) -> LeaseVerdict {
    let clock = match answer {
        LeaseAnswer::NotOurs => return LeaseVerdict::Stop(LeaseLoss::NotOurs),
        LeaseAnswer::Renewed { lease_secs } => LeaseClock {
            lease: lease_length(lease_secs),
            renewed_at: sent_at.max(clock.renewed_at),
        },
        LeaseAnswer::NoAnswer => clock,
    };
    if now > clock.fence_at() {
        let unrenewed = now.saturating_duration_since(clock.renewed_at);
        return LeaseVerdict::Stop(LeaseLoss::Unrenewed { unrenewed });
    }
    LeaseVerdict::KeepBuilding(clock)
}

/// When the heartbeat loop wakes up next: after `interval`, or at the earliest fence of a
/// build still holding its lease if that comes first, so a build is stopped at its fence and
/// not up to a heartbeat interval later.
pub fn next_heartbeat_wake(
    now: Instant,
    interval: Duration,
    earliest_fence: Option<Instant>,
) -> Instant {
    let next = now + interval;
    earliest_fence.map_or(next, |fence| next.min(fence.max(now)))
}

/// How long to wait between heartbeats: a third of the shortest lease held (at least 200 ms),
/// or a second while none is held.
pub fn heartbeat_interval(shortest_lease: Option<Duration>) -> Duration {
    shortest_lease.map_or(Duration::from_secs(1), |lease| {
        (lease / 3).max(Duration::from_millis(200))
    })
}

/// How an attempt that ran ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Given up without a result (`Released`): the coordinator retries it at once.
    Release(ReleaseReason),
    /// Reported with its outcome (`Finished`), cancelled ones included.
    Finish,
}

/// Why an attempt was released rather than finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseReason {
    /// The agent stopped it because it no longer holds the lease.
    LeaseLost(LeaseLoss),
    /// The agent was told to stop its running builds (a second signal, or the drain timeout).
    ShuttingDown,
}

impl fmt::Display for ReleaseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReleaseReason::LeaseLost(loss) => loss.fmt(f),
            ReleaseReason::ShuttingDown => f.write_str("the agent is shutting down"),
        }
    }
}

/// Release or finish: a build cancelled because the agent lost its lease or is shutting down
/// is released (someone else should build it); one cancelled by a user, and every build that
/// ended by itself, is finished with its result.
pub fn attempt_end(
    result: RunResult,
    lease_loss: Option<LeaseLoss>,
    shutting_down: bool,
) -> AttemptEnd {
    if result != RunResult::Cancelled {
        return AttemptEnd::Finish;
    }
    match lease_loss {
        Some(loss) => AttemptEnd::Release(ReleaseReason::LeaseLost(loss)),
        None if shutting_down => AttemptEnd::Release(ReleaseReason::ShuttingDown),
        None => AttemptEnd::Finish,
    }
}

/// How long to wait before asking an unreachable coordinator again, after `failures` failed
/// tries in a row: 1 s, doubling, at most 30 s.
pub fn coordinator_retry_delay(failures: u32) -> Duration {
    let doubled = 1u64
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u64::MAX);
    Duration::from_secs(doubled.min(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(granted: bool, lease_secs: u64) -> ClaimResponse {
        ClaimResponse {
            granted,
            reason: (!granted).then(|| "run is cancelled".to_owned()),
            lease_secs,
        }
    }

    #[test]
    fn a_failed_claim_requeues_and_an_answered_one_is_acknowledged() {
        assert_eq!(after_claim(None), AfterClaim::Requeue);
        assert_eq!(after_claim(None).settle(), Settle::Requeue);
        let refused = after_claim(Some(&claim(false, 0)));
        assert_eq!(
            refused,
            AfterClaim::Drop {
                reason: Some("run is cancelled".to_owned())
            }
        );
        assert_eq!(refused.settle(), Settle::Ack);
        let granted = after_claim(Some(&claim(true, 30)));
        assert_eq!(
            granted,
            AfterClaim::Build {
                lease: Duration::from_secs(30)
            }
        );
        assert_eq!(granted.settle(), Settle::Ack);
    }

    #[test]
    fn a_grant_without_a_lease_length_gets_the_shortest_lease() {
        assert_eq!(
            after_claim(Some(&claim(true, 0))),
            AfterClaim::Build {
                lease: Duration::from_secs(1)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_lease_counts_from_when_its_heartbeat_was_sent() {
        let granted = Instant::now();
        let clock = LeaseClock {
            lease: Duration::from_secs(12),
            renewed_at: granted,
        };
        tokio::time::advance(Duration::from_secs(8)).await;
        let sent_at = Instant::now();
        // The answer takes 3 s: the coordinator renewed somewhere in between.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            lease_verdict(
                clock,
                LeaseAnswer::Renewed { lease_secs: 20 },
                sent_at,
                Instant::now()
            ),
            LeaseVerdict::KeepBuilding(LeaseClock {
                lease: Duration::from_secs(20),
                renewed_at: sent_at,
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_wakes_at_the_earliest_fence_when_it_comes_before_the_next_heartbeat() {
        let now = Instant::now();
        let second = Duration::from_secs(1);
        assert_eq!(next_heartbeat_wake(now, second, None), now + second);
        assert_eq!(
            next_heartbeat_wake(now, second, Some(now + second / 4)),
            now + second / 4
        );
        assert_eq!(
            next_heartbeat_wake(now, second, Some(now + second * 5)),
            now + second
        );
        assert_eq!(
            next_heartbeat_wake(now + second, second, Some(now)),
            now + second,
            "a fence already passed means now, never the past"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_lease_stops_after_three_quarters_of_it() {
        let clock = LeaseClock {
            lease: Duration::from_secs(12),
            renewed_at: Instant::now(),
        };
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(
            lease_verdict(clock, LeaseAnswer::NoAnswer, Instant::now(), Instant::now()),
            LeaseVerdict::KeepBuilding(clock),
            "exactly three quarters is still in time"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let verdict = lease_verdict(clock, LeaseAnswer::NoAnswer, Instant::now(), Instant::now());
        let LeaseVerdict::Stop(loss) = verdict else {
            panic!("{verdict:?}");
        };
        assert_eq!(
            loss.to_string(),
            "the agent could not renew its lease for 9 s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_coordinator_saying_not_ours_stops_at_once() {
        let clock = LeaseClock {
            lease: Duration::from_secs(12),
            renewed_at: Instant::now(),
        };
        assert_eq!(
            lease_verdict(clock, LeaseAnswer::NotOurs, Instant::now(), Instant::now()),
            LeaseVerdict::Stop(LeaseLoss::NotOurs)
        );
    }

    #[test]
    fn a_heartbeat_answers_only_for_the_leases_it_carried() {
        use slimci_proto::{Attempt, RunId};
        let ours = Lease {
            run_id: RunId::new(),
            attempt: Attempt(1),
        };
        let lost = Lease {
            run_id: RunId::new(),
            attempt: Attempt(2),
        };
        let granted_meanwhile = Lease {
            run_id: RunId::new(),
            attempt: Attempt(1),
        };
        let sent = [ours, lost];
        let answer = HeartbeatResponse {
            lease_secs: 30,
            lost: vec![lost],
        };
        assert_eq!(
            lease_answer(&ours, &sent, Some(&answer)),
            LeaseAnswer::Renewed { lease_secs: 30 }
        );
        assert_eq!(
            lease_answer(&lost, &sent, Some(&answer)),
            LeaseAnswer::NotOurs
        );
        assert_eq!(
            lease_answer(&granted_meanwhile, &sent, Some(&answer)),
            LeaseAnswer::NoAnswer
        );
        assert_eq!(lease_answer(&ours, &sent, None), LeaseAnswer::NoAnswer);
    }

    #[test]
    fn heartbeats_come_every_third_of_the_shortest_lease() {
        assert_eq!(heartbeat_interval(None), Duration::from_secs(1));
        assert_eq!(
            heartbeat_interval(Some(Duration::from_secs(30))),
            Duration::from_secs(10)
        );
        assert_eq!(
            heartbeat_interval(Some(Duration::from_millis(300))),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn lost_leases_and_shutdown_release_and_everything_else_finishes() {
        let lost = Some(LeaseLoss::NotOurs);
        assert_eq!(
            attempt_end(RunResult::Cancelled, lost.clone(), false),
            AttemptEnd::Release(ReleaseReason::LeaseLost(LeaseLoss::NotOurs))
        );
        assert_eq!(
            attempt_end(RunResult::Cancelled, None, true),
            AttemptEnd::Release(ReleaseReason::ShuttingDown)
        );
        assert_eq!(
            ReleaseReason::ShuttingDown.to_string(),
            "the agent is shutting down"
        );
        // Cancelled by a user: reported cancelled.
        assert_eq!(
            attempt_end(RunResult::Cancelled, None, false),
            AttemptEnd::Finish
        );
        // A build that ended by itself keeps its result, even if the lease went meanwhile.
        for result in [
            RunResult::Success,
            RunResult::Failed,
            RunResult::Error,
            RunResult::TimedOut,
        ] {
            assert_eq!(attempt_end(result, lost.clone(), true), AttemptEnd::Finish);
        }
    }

    #[test]
    fn coordinator_retries_back_off_to_thirty_seconds() {
        let delays: Vec<u64> = (1..=7)
            .map(|failures| coordinator_retry_delay(failures).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(coordinator_retry_delay(200).as_secs(), 30);
    }
}
