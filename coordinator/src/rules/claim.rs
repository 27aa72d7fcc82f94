//! The fences around a running attempt: who may claim a run, what a cancel does, and which
//! agent events apply.

use slimci_proto::{Attempt, ClaimRequest};

use super::RunStatus;

/// The parts of a run a claim is judged on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimView {
    pub status: RunStatus,
    pub attempt: Attempt,
    pub agent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimDecision {
    Grant,
    Refuse(String),
}

impl ClaimDecision {
    /// A granted claim that another agent's claim of the same attempt beat to the store.
    pub fn lost_race() -> ClaimDecision {
        ClaimDecision::Refuse("claimed concurrently by another agent".to_owned())
    }
}

/// Only the current attempt of a queued run can be claimed, and only once: this is the fence
/// that keeps two agents from building one run. `run` is none for a run the store does not know.
pub fn decide_claim(run: Option<&ClaimView>, claim: &ClaimRequest) -> ClaimDecision {
    let Some(run) = run else {
        return ClaimDecision::Refuse(format!("unknown run {}", claim.run_id));
    };
    if claim.attempt != run.attempt {
        return ClaimDecision::Refuse(format!(
            "attempt {} is stale; the run is on attempt {}",
            claim.attempt, run.attempt
        ));
    }
    match run.status {
        RunStatus::Queued => ClaimDecision::Grant,
        RunStatus::Running => ClaimDecision::Refuse(format!(
            "already claimed by {}",
            run.agent.as_deref().unwrap_or("another agent")
        )),
        terminal => ClaimDecision::Refuse(format!("the run is already {}", terminal.as_str())),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelDecision {
    /// Not started: the coordinator ends it now; an agent that later gets the job is refused
    /// its claim.
    EndNow,
    /// Building: tell the agents; the run ends when its agent reports the tree is gone.
    SignalAgents,
    AlreadyFinished(RunStatus),
}

/// The message of a run a user cancelled, and the reason its agent is given.
pub const CANCELLED_BY_USER: &str = "cancelled by user";

pub fn decide_cancel(status: RunStatus) -> CancelDecision {
    match status {
        RunStatus::Queued => CancelDecision::EndNow,
        RunStatus::Running => CancelDecision::SignalAgents,
        terminal => CancelDecision::AlreadyFinished(terminal),
    }
}

/// What the coordinator does with an agent event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventDisposition {
    Apply,
    /// Same or older sequence number: a resend.
    Duplicate,
    /// From an attempt that is not the run's current one (fenced off).
    StaleAttempt,
    /// The run already ended; late reports change nothing.
    RunEnded,
}

pub fn event_disposition(
    run_status: RunStatus,
    run_attempt: Attempt,
    last_seq: u64,
    event_attempt: Attempt,
    event_seq: u64,
) -> EventDisposition {
    if event_attempt != run_attempt {
        return EventDisposition::StaleAttempt;
    }
    if event_seq <= last_seq {
        return EventDisposition::Duplicate;
    }
    if run_status.is_terminal() {
        return EventDisposition::RunEnded;
    }
    EventDisposition::Apply
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimci_proto::{AgentName, RunId};

    fn claim(attempt: u32) -> ClaimRequest {
        ClaimRequest {
            run_id: RunId::new(),
            attempt: Attempt(attempt),
            agent: AgentName::parse("a1").unwrap(),
        }
    }

    #[test]
    fn a_run_is_claimed_once_and_only_on_its_current_attempt() {
        let queued = ClaimView {
            status: RunStatus::Queued,
            attempt: Attempt(2),
            agent: None,
        };
        assert_eq!(decide_claim(Some(&queued), &claim(2)), ClaimDecision::Grant);
        assert!(matches!(
            decide_claim(Some(&queued), &claim(1)),
            ClaimDecision::Refuse(_)
        ));
        let running = ClaimView {
            status: RunStatus::Running,
            attempt: Attempt(2),
            agent: Some("a0".into()),
        };
        assert_eq!(
            decide_claim(Some(&running), &claim(2)),
            ClaimDecision::Refuse("already claimed by a0".into())
        );
        assert!(matches!(
            decide_claim(None, &claim(2)),
            ClaimDecision::Refuse(reason) if reason.starts_with("unknown run")
        ));
        let cancelled = ClaimView {
            status: RunStatus::Cancelled,
            ..queued
        };
        assert_eq!(
            decide_claim(Some(&cancelled), &claim(2)),
            ClaimDecision::Refuse("the run is already cancelled".into())
        );
    }

    #[test]
    fn cancel_depends_on_where_the_run_is() {
        assert_eq!(decide_cancel(RunStatus::Queued), CancelDecision::EndNow);
        assert_eq!(
            decide_cancel(RunStatus::Running),
            CancelDecision::SignalAgents
        );
        assert_eq!(
            decide_cancel(RunStatus::Failed),
            CancelDecision::AlreadyFinished(RunStatus::Failed)
        );
    }

    #[test]
    fn events_are_fenced_and_deduplicated() {
        use EventDisposition::*;
        let run = |status| event_disposition(status, Attempt(2), 5, Attempt(2), 6);
        assert_eq!(run(RunStatus::Running), Apply);
        assert_eq!(run(RunStatus::Success), RunEnded);
        assert_eq!(
            event_disposition(RunStatus::Running, Attempt(2), 5, Attempt(2), 5),
            Duplicate
        );
        assert_eq!(
            event_disposition(RunStatus::Running, Attempt(2), 5, Attempt(1), 9),
            StaleAttempt
        );
    }
}
