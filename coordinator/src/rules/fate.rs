//! What an attempt's end makes of its run: the status a finished attempt gets (the agent's
//! result, or `superseded`, or `error` for a deploy whose manifest or commit never arrived),
//! and what a lost attempt becomes (the next attempt, or the end of the run). The store
//! executes these decisions; every message they put on a run is written here, once.

use std::fmt;

use slimci_proto::{AgentName, Attempt, RunId, RunKind, RunResult, Sha};

use super::RunStatus;

/// The message of a run a newer commit of its PR replaced; `detail` says more when there is
/// more to say (how the build had ended, why its attempt was lost).
pub fn superseded_message(newer: RunId, detail: Option<&str>) -> String {
    let message = format!("superseded by run {newer}, a newer commit of the PR");
    match detail {
        Some(detail) => format!("{message} ({detail})"),
        None => message,
    }
}

/// What the coordinator knows of a run when its attempt's `Finished` arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedAttempt<'a> {
    pub kind: RunKind,
    /// The result the agent reported, and its message.
    pub result: RunResult,
    pub message: Option<&'a str>,
    /// The newer run of the PR that replaces this one, if any.
    pub superseded_by: Option<RunId>,
    /// The commit the agent reported building.
    pub sha: Option<&'a Sha>,
    /// The sha256 of the run's stored `manifest.json`, if one was stored.
    pub manifest_sha256: Option<&'a str>,
}

/// How a finished attempt ends its run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// The agent's result stands, with its message.
    AsReported {
        status: RunStatus,
        message: Option<String>,
    },
    /// A successful deploy whose manifest and commit are stored: it succeeds and becomes the
    /// repository's production state.
    Promote {
        sha: Sha,
        manifest_sha256: String,
        message: Option<String>,
    },
    /// A newer commit of the PR replaced the run while it built; its tree is gone now, so the
    /// newer run may start.
    Superseded { message: String },
    /// A deploy that reported success, but whose `manifest.json` or commit never reached the
    /// coordinator: it cannot become production state, so it is an error.
    DeployIncomplete { message: String },
}

impl Finish {
    pub fn status(&self) -> RunStatus {
        match self {
            Finish::AsReported { status, .. } => *status,
            Finish::Promote { .. } => RunStatus::Success,
            Finish::Superseded { .. } => RunStatus::Superseded,
            Finish::DeployIncomplete { .. } => RunStatus::Error,
        }
    }

    pub fn message(&self) -> Option<&str> {
        match self {
            Finish::AsReported { message, .. } | Finish::Promote { message, .. } => {
                message.as_deref()
            }
            Finish::Superseded { message } | Finish::DeployIncomplete { message } => Some(message),
        }
    }
}

/// A superseded run ends `superseded` whatever its build did (deploys are never superseded);
/// a successful deploy becomes production state only with its manifest and commit stored.
pub fn decide_finish(attempt: &FinishedAttempt) -> Finish {
    let reported = RunStatus::from_result(attempt.result);
    if let Some(newer) = attempt.superseded_by {
        let detail = match attempt.result {
            RunResult::Cancelled => None,
            _ => Some(format!("this build had ended {}", reported.as_str())),
        };
        return Finish::Superseded {
            message: superseded_message(newer, detail.as_deref()),
        };
    }
    let message = attempt.message.map(str::to_owned);
    if attempt.kind != RunKind::Deploy || attempt.result != RunResult::Success {
        return Finish::AsReported {
            status: reported,
            message,
        };
    }
    match (attempt.sha, attempt.manifest_sha256) {
        (Some(sha), Some(manifest_sha256)) => Finish::Promote {
            sha: sha.clone(),
            manifest_sha256: manifest_sha256.to_owned(),
            message,
        },
        _ => Finish::DeployIncomplete {
            message: "the deploy built, but its manifest.json or commit never reached the coordinator, so production state was not updated".to_owned(),
        },
    }
}

/// Why an attempt ended without a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LostReason {
    /// Its lease ran out: the agent sent no heartbeat in time.
    LeaseExpired {
        agent: Option<String>,
        lease_secs: u64,
    },
    /// Its agent gave it up (the agent's `Released` event), saying why.
    Released { agent: AgentName, reason: String },
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LostReason::LeaseExpired { agent, lease_secs } => write!(
                f,
                "its agent {} sent no heartbeat for {lease_secs} s (it died, or lost the coordinator)",
                agent.as_deref().unwrap_or("?")
            ),
            LostReason::Released { agent, reason } => {
                write!(f, "agent {agent} released it: {reason}")
            }
        }
    }
}

/// The parts of a running run a lost attempt is judged on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostAttemptView {
    pub attempt: Attempt,
    pub superseded_by: Option<RunId>,
    pub cancel_requested: bool,
}

/// What a lost attempt becomes. Every variant but `Retry` ends the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LostAttempt {
    /// It was being superseded anyway: the run ends `superseded`.
    Superseded { message: String },
    /// It was being cancelled anyway: the run ends `cancelled`.
    Cancelled { message: String },
    /// The run is queued again as attempt `next`.
    Retry { next: Attempt, message: String },
    /// That was the last attempt allowed: the run ends `error` and its job is dead-lettered
    /// with the message as the reason.
    GiveUp { message: String },
}

impl LostAttempt {
    /// The status the run gets: `queued` again for a retry, else the one it ends with.
    pub fn status(&self) -> RunStatus {
        match self {
            LostAttempt::Superseded { .. } => RunStatus::Superseded,
            LostAttempt::Cancelled { .. } => RunStatus::Cancelled,
            LostAttempt::Retry { .. } => RunStatus::Queued,
            LostAttempt::GiveUp { .. } => RunStatus::Error,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            LostAttempt::Superseded { message }
            | LostAttempt::Cancelled { message }
            | LostAttempt::Retry { message, .. }
            | LostAttempt::GiveUp { message } => message,
        }
    }
}

/// A lost attempt is retried up to `max_attempts` attempts in all, unless the run was being
/// superseded or cancelled anyway.
pub fn decide_lost_attempt(
    run: &LostAttemptView,
    reason: &LostReason,
    max_attempts: u32,
) -> LostAttempt {
    let attempt = run.attempt;
    if let Some(newer) = run.superseded_by {
        return LostAttempt::Superseded {
            message: superseded_message(newer, Some(&reason.to_string())),
        };
    }
    if run.cancel_requested {
        return LostAttempt::Cancelled {
            message: format!("cancelled ({reason})"),
        };
    }
    if attempt.0 >= max_attempts {
        return LostAttempt::GiveUp {
            message: format!("gave up after {attempt} attempts; the last: {reason}"),
        };
    }
    let next = Attempt(attempt.0 + 1);
    LostAttempt::Retry {
        next,
        message: format!(
            "attempt {attempt} failed without a result: {reason}; retrying as attempt {next}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha() -> Sha {
        Sha::parse(&"ab".repeat(20)).unwrap()
    }

    fn finished(kind: RunKind, result: RunResult) -> FinishedAttempt<'static> {
        FinishedAttempt {
            kind,
            result,
            message: Some("dbt said so"),
            superseded_by: None,
            sha: None,
            manifest_sha256: None,
        }
    }

    #[test]
    fn a_finished_attempt_keeps_the_agents_result() {
        assert_eq!(
            decide_finish(&finished(RunKind::Ci, RunResult::Failed)),
            Finish::AsReported {
                status: RunStatus::Failed,
                message: Some("dbt said so".into())
            }
        );
        let failed_deploy = decide_finish(&finished(RunKind::Deploy, RunResult::Error));
        assert_eq!(failed_deploy.status(), RunStatus::Error);
        assert_eq!(failed_deploy.message(), Some("dbt said so"));
    }

    #[test]
    fn a_superseded_build_ends_superseded_saying_how_it_had_ended() {
        let newer = RunId::new();
        let cancelled = FinishedAttempt {
            superseded_by: Some(newer),
            ..finished(RunKind::Ci, RunResult::Cancelled)
        };
        assert_eq!(
            decide_finish(&cancelled),
            Finish::Superseded {
                message: format!("superseded by run {newer}, a newer commit of the PR")
            }
        );
        let failed = FinishedAttempt {
            result: RunResult::Failed,
            ..cancelled
        };
        let decision = decide_finish(&failed);
        assert_eq!(decision.status(), RunStatus::Superseded);
        assert!(
            decision
                .message()
                .unwrap()
                .ends_with("(this build had ended failed)"),
            "{decision:?}"
        );
    }

    #[test]
    fn a_deploy_becomes_production_state_only_with_manifest_and_commit() {
        let sha = sha();
        let complete = FinishedAttempt {
            sha: Some(&sha),
            manifest_sha256: Some("cafe"),
            ..finished(RunKind::Deploy, RunResult::Success)
        };
        assert_eq!(
            decide_finish(&complete),
            Finish::Promote {
                sha: sha.clone(),
                manifest_sha256: "cafe".into(),
                message: Some("dbt said so".into())
            }
        );
        for incomplete in [
            FinishedAttempt {
                sha: None,
                ..complete.clone()
            },
            FinishedAttempt {
                manifest_sha256: None,
                ..complete.clone()
            },
        ] {
            let decision = decide_finish(&incomplete);
            assert!(
                matches!(decision, Finish::DeployIncomplete { .. }),
                "{decision:?}"
            );
            assert_eq!(decision.status(), RunStatus::Error);
        }
        let ci = FinishedAttempt {
            kind: RunKind::Ci,
            ..complete
        };
        assert_eq!(decide_finish(&ci).status(), RunStatus::Success);
    }

    fn lost(attempt: u32) -> LostAttemptView {
        LostAttemptView {
            attempt: Attempt(attempt),
            superseded_by: None,
            cancel_requested: false,
        }
    }

    #[test]
    fn a_lost_attempt_is_retried_until_the_last_allowed() {
        let reason = LostReason::LeaseExpired {
            agent: Some("a1".into()),
            lease_secs: 30,
        };
        assert_eq!(
            decide_lost_attempt(&lost(1), &reason, 3),
            LostAttempt::Retry {
                next: Attempt(2),
                message: "attempt 1 failed without a result: its agent a1 sent no heartbeat for 30 s (it died, or lost the coordinator); retrying as attempt 2".into()
            }
        );
        let given_up = decide_lost_attempt(&lost(3), &reason, 3);
        assert_eq!(given_up.status(), RunStatus::Error);
        assert!(
            given_up
                .message()
                .starts_with("gave up after 3 attempts; the last: its agent a1"),
            "{given_up:?}"
        );
    }

    #[test]
    fn a_lost_attempt_of_a_run_being_stopped_ends_it() {
        let reason = LostReason::Released {
            agent: AgentName::parse("a2").unwrap(),
            reason: "shutting down".into(),
        };
        let newer = RunId::new();
        let superseded = LostAttemptView {
            superseded_by: Some(newer),
            cancel_requested: true,
            ..lost(1)
        };
        assert_eq!(
            decide_lost_attempt(&superseded, &reason, 3),
            LostAttempt::Superseded {
                message: format!(
                    "superseded by run {newer}, a newer commit of the PR (agent a2 released it: shutting down)"
                )
            }
        );
        let cancelled = LostAttemptView {
            cancel_requested: true,
            ..lost(3)
        };
        assert_eq!(
            decide_lost_attempt(&cancelled, &reason, 3),
            LostAttempt::Cancelled {
                message: "cancelled (agent a2 released it: shutting down)".into()
            }
        );
    }
}
