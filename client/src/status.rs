//! `RunStatus` as the user API spells it (`queued`, `running`, `success`, ...).

use serde::{Deserialize, Serialize};

/// Where a run stands. The last six are terminal: nothing moves a run out of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

    /// The status of a run whose agent reported `result`.
    pub fn from_result(result: slimci_proto::RunResult) -> RunStatus {
        use slimci_proto::RunResult;
        match result {
            RunResult::Success => RunStatus::Success,
            RunResult::Failed => RunStatus::Failed,
            RunResult::Error => RunStatus::Error,
            RunResult::Cancelled => RunStatus::Cancelled,
            RunResult::TimedOut => RunStatus::TimedOut,
        }
    }

    pub fn parse(text: &str) -> Option<RunStatus> {
        RunStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
    }

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
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_by_their_wire_names() {
        for status in RunStatus::ALL {
            assert_eq!(RunStatus::parse(status.as_str()), Some(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::Value::from(status.as_str())
            );
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
