//! `Stop`: a step that ended the attempt early, with the result to report and a message for
//! people; and the messages for how a dbt invocation ended (timeout, cancel, the memory and
//! pids limits).

use std::time::Duration;

use slimci_proto::RunResult;

use crate::process::{Exit, Ran};

/// A failed step: the result to report and a message for people.
#[derive(Debug)]
pub struct Stop {
    pub result: RunResult,
    pub message: String,
}

impl Stop {
    /// An error the agent met (its message says which step and why).
    pub fn error(message: impl Into<String>) -> Stop {
        Stop {
            result: RunResult::Error,
            message: message.into(),
        }
    }

    /// The attempt was cancelled before a step.
    pub fn cancelled() -> Stop {
        Stop {
            result: RunResult::Cancelled,
            message: "cancelled".to_owned(),
        }
    }

    /// The attempt ran out of time before a step.
    pub fn timed_out(timeout: Duration) -> Stop {
        Stop {
            result: RunResult::TimedOut,
            message: format!("exceeded the run timeout of {} s", timeout.as_secs()),
        }
    }

    /// A dbt invocation (`what`) that did not end well, with the pids limit noted if it hit it.
    pub fn for_dbt(ran: &Ran, what: &str, timeout: Duration) -> Stop {
        let mut stop = Stop::for_dbt_exit(ran, what, timeout);
        if ran.pids_limit_hits > 0 {
            stop.message = format!("{}; {}", stop.message, pids_limit_note(ran));
        }
        stop
    }

    fn for_dbt_exit(ran: &Ran, what: &str, timeout: Duration) -> Stop {
        match ran.exit {
            Exit::TimedOut => Stop {
                result: RunResult::TimedOut,
                message: format!(
                    "exceeded the run timeout of {} s during {what}",
                    timeout.as_secs()
                ),
            },
            Exit::Cancelled => Stop {
                result: RunResult::Cancelled,
                message: format!("cancelled during {what}"),
            },
            _ if ran.oom_kills > 0 => Stop::error(memory_limit_message(ran, what)),
            Exit::Signal(signal) => Stop::error(format!("{what} was killed by signal {signal}")),
            Exit::Code(code) => Stop::error(format!("{what} failed with exit code {code}")),
        }
    }
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

/// The run's message when the kernel killed part of the build for its memory.
fn memory_limit_message(ran: &Ran, what: &str) -> String {
    let limit = ran
        .memory_limit
        .map(|bytes| format!(" of {} MiB", mib(bytes)))
        .unwrap_or_default();
    format!(
        "memory limit: {what} used more than its memory limit{limit}, and the kernel killed {} of its processes (sandbox.memory_limit)",
        ran.oom_kills
    )
}

/// What to say when the build hit its pids limit (it may have gone on without the forks).
pub fn pids_limit_note(ran: &Ran) -> String {
    let limit = ran
        .pids_limit
        .map(|limit| format!(" of {limit} processes"))
        .unwrap_or_default();
    format!(
        "pids limit: the build hit its limit{limit}; {} forks were refused (sandbox.pids_limit)",
        ran.pids_limit_hits
    )
}
