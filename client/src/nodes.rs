//! What a node's dbt status means for people: the summary counts and which nodes failed, one
//! definition for the API's summary, the GitHub comment and the CLI.

use slimci_proto::NodeResult;

use crate::views::Summary;

/// The dbt statuses of a node that failed: a test that failed, or any node that errored.
pub const FAILURE_STATUSES: [&str; 3] = ["fail", "error", "runtime error"];

/// A node that failed: its status is one of `FAILURE_STATUSES`.
pub fn is_failure(node: &NodeResult) -> bool {
    FAILURE_STATUSES.contains(&node.status.as_str())
}

/// Counts nodes by kind and status.
pub fn summarize(nodes: &[NodeResult]) -> Summary {
    let mut summary = Summary {
        selected: nodes.len() as u32,
        ..Summary::default()
    };
    for node in nodes {
        match (node.resource_type.as_str(), node.status.as_str()) {
            ("test" | "unit_test", "pass") => summary.tests_passed += 1,
            ("test" | "unit_test", "fail") => summary.tests_failed += 1,
            (_, "success") => summary.built += 1,
            (_, "warn") => summary.warned += 1,
            (_, "error" | "runtime error") => summary.errored += 1,
            (_, "skipped") => summary.skipped += 1,
            _ => {}
        }
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(resource_type: &str, status: &str) -> NodeResult {
        NodeResult {
            unique_id: format!("{resource_type}.shop.x"),
            resource_type: resource_type.into(),
            status: status.into(),
            execution_time_s: 0.1,
            message: None,
            failures: None,
            relation: None,
            adapter_response: None,
            started_at: None,
            completed_at: None,
        }
    }

    #[test]
    fn summary_counts_by_kind_and_status() {
        let nodes = [
            node("model", "success"),
            node("seed", "success"),
            node("test", "pass"),
            node("test", "fail"),
            node("model", "error"),
            node("model", "skipped"),
            node("test", "warn"),
        ];
        assert_eq!(
            summarize(&nodes),
            Summary {
                selected: 7,
                built: 2,
                tests_passed: 1,
                tests_failed: 1,
                warned: 1,
                errored: 1,
                skipped: 1
            }
        );
    }

    #[test]
    fn failures_are_failed_tests_and_errors() {
        assert!(is_failure(&node("test", "fail")));
        assert!(is_failure(&node("model", "error")));
        assert!(is_failure(&node("model", "runtime error")));
        assert!(!is_failure(&node("test", "warn")));
        assert!(!is_failure(&node("model", "success")));
        assert!(!is_failure(&node("model", "skipped")));
    }
}
