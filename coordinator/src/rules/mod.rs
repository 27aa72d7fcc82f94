//! The coordinator's decisions, as plain functions over plain data: which requests are
//! accepted, which waiting runs go out, who may claim a run, what a cancel does, which agent
//! events apply, and what a finished or lost attempt becomes. No I/O here (no async, no SQL, no
//! sockets); the HTTP, AMQP and SQLite adapters call these and act on the answer.
//!
//! `request`: validating and admitting requests. `dispatch`: superseding on submit, and which
//! waiting runs go to the broker. `claim`: claims, cancels and agent events. `fate`: what a
//! finished or lost attempt becomes, and the messages that say so. `webhook`: pull request
//! actions.

mod claim;
mod dispatch;
mod fate;
#[cfg(test)]
mod fixtures;
mod request;
mod webhook;

use slimci_proto::RunResult;

pub use claim::{
    CANCELLED_BY_USER, CancelDecision, ClaimDecision, ClaimView, EventDisposition, decide_cancel,
    decide_claim, event_disposition,
};
pub use dispatch::{ActiveRun, Caps, SubmitDecision, decide_submit, dispatch};
pub use fate::{
    Finish, FinishedAttempt, LostAttempt, LostAttemptView, LostReason, decide_finish,
    decide_lost_attempt, superseded_message,
};
pub use request::{
    Admission, RequestError, RunRequest, ValidRequest, admit, no_production_state_message,
    teardown_request, validate_request,
};
pub use webhook::{PullRequestAction, pull_request_action};

/// Where a run stands. The last six are terminal: nothing moves a run out of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Success,
    Failed,
    Error,
    Cancelled,
    Superseded,
    TimedOut,
}

impl RunStatus {
    pub const ALL: [RunStatus; 8] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Success,
        RunStatus::Failed,
        RunStatus::Error,
        RunStatus::Cancelled,
        RunStatus::Superseded,
        RunStatus::TimedOut,
    ];

    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Success => "success",
            RunStatus::Failed => "failed",
            RunStatus::Error => "error",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Superseded => "superseded",
            RunStatus::TimedOut => "timed_out",
        }
    }

    pub fn parse(text: &str) -> Option<RunStatus> {
        RunStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
    }

    pub fn from_result(result: RunResult) -> RunStatus {
        match result {
            RunResult::Success => RunStatus::Success,
            RunResult::Failed => RunStatus::Failed,
            RunResult::Error => RunStatus::Error,
            RunResult::Cancelled => RunStatus::Cancelled,
            RunResult::TimedOut => RunStatus::TimedOut,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for status in RunStatus::ALL {
            assert_eq!(RunStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(
            RunStatus::ALL
                .iter()
                .filter(|status| !status.is_terminal())
                .count(),
            2
        );
    }
}
