//! The attribute names slimci puts on spans, in one place. Most come from OpenTelemetry's
//! CI/CD and VCS semantic conventions, which are of "development" stability: if a name
//! changes upstream, it changes here and nowhere else. The `slimci.*` names are our own.
//!
//! No attribute ever carries a secret: names, ids, commits, statuses and counts only (no URL
//! with credentials, no log line, no profile).

/// The pipeline: a repository's CI or deploy (`<repository> ci`).
pub const CICD_PIPELINE_NAME: &str = "cicd.pipeline.name";
/// The run id.
pub const CICD_PIPELINE_RUN_ID: &str = "cicd.pipeline.run.id";
/// How the run ended: `success`, `failure`, `error`, `cancellation`, `timeout`, `skip`.
pub const CICD_PIPELINE_RESULT: &str = "cicd.pipeline.result";
/// A task of the run: a phase (`checkout`, `build`, ...).
pub const CICD_PIPELINE_TASK_NAME: &str = "cicd.pipeline.task.name";
/// The task's id within the run: `<run>/<attempt>/<phase>`.
pub const CICD_PIPELINE_TASK_RUN_ID: &str = "cicd.pipeline.task.run.id";
/// How the task ended: the same values as the pipeline result.
pub const CICD_PIPELINE_TASK_RUN_RESULT: &str = "cicd.pipeline.task.run.result";
/// The agent that builds the run.
pub const CICD_WORKER_NAME: &str = "cicd.worker.name";

/// The repository, as configured in slimci.
pub const VCS_REPOSITORY_NAME: &str = "vcs.repository.name";
/// The pull request number.
pub const VCS_CHANGE_ID: &str = "vcs.change.id";
/// The commit built.
pub const VCS_REF_HEAD_REVISION: &str = "vcs.ref.head.revision";
/// The ref the run asked for (`refs/pull/7/head`, `refs/heads/main`).
pub const VCS_REF_HEAD_NAME: &str = "vcs.ref.head.name";

/// RabbitMQ, as the messaging conventions name it.
pub const MESSAGING_SYSTEM: &str = "messaging.system";
pub const MESSAGING_DESTINATION_NAME: &str = "messaging.destination.name";
pub const MESSAGING_OPERATION_TYPE: &str = "messaging.operation.type";

/// slimci's own: the run's kind (`ci`, `deploy`, `teardown`, `publish`), the attempt, the
/// status the coordinator gave it.
pub const SLIMCI_RUN_KIND: &str = "slimci.run.kind";
pub const SLIMCI_RUN_ATTEMPT: &str = "slimci.run.attempt";
pub const SLIMCI_RUN_STATUS: &str = "slimci.run.status";
/// The PR's isolation a CI run builds in or a teardown drops (`pr_<slug>_<n>`).
pub const SLIMCI_ISOLATION_NAME: &str = "slimci.isolation.name";
/// Why the sweeper queued a teardown (`closed on GitHub`, `unknown to GitHub`, ...), and how
/// long ago the PR's last build ended.
pub const SLIMCI_SWEEP_REASON: &str = "slimci.sweep.reason";
pub const SLIMCI_SWEEP_LAST_BUILD_HOURS: &str = "slimci.sweep.last_build_hours";
/// A published production manifest: its size, sha256, and how many nodes it has.
pub const SLIMCI_MANIFEST_BYTES: &str = "slimci.manifest.bytes";
pub const SLIMCI_MANIFEST_SHA256: &str = "slimci.manifest.sha256";
pub const SLIMCI_MANIFEST_NODES: &str = "slimci.manifest.nodes";
/// One dbt node of the build: its unique id, kind, dbt status, relation, rows, and
/// Snowflake's query id where there is one.
pub const DBT_NODE_UNIQUE_ID: &str = "dbt.node.unique_id";
pub const DBT_NODE_RESOURCE_TYPE: &str = "dbt.node.resource_type";
pub const DBT_NODE_STATUS: &str = "dbt.node.status";
pub const DBT_NODE_RELATION: &str = "dbt.node.relation";
pub const DBT_NODE_ROWS_AFFECTED: &str = "dbt.node.rows_affected";
pub const DBT_NODE_QUERY_ID: &str = "dbt.node.query_id";

/// A run's status as a `cicd.pipeline.result` value.
pub fn pipeline_result(status: &str) -> &'static str {
    match status {
        "success" => "success",
        "failed" => "failure",
        "cancelled" | "superseded" => "cancellation",
        "timed_out" => "timeout",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_conventions_results() {
        assert_eq!(pipeline_result("success"), "success");
        assert_eq!(pipeline_result("failed"), "failure");
        assert_eq!(pipeline_result("superseded"), "cancellation");
        assert_eq!(pipeline_result("timed_out"), "timeout");
        assert_eq!(pipeline_result("error"), "error");
    }
}
