//! What a build produced, read from dbt's files: every node's outcome (`read_run_results`),
//! the production nodes a CI build deferred to (`read_deferred`), and the run's one-line
//! message (`build_message`, with `failure_summary` for failed nodes).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use slimci_proto::run_results::{RunResultEntry, RunResults};
use slimci_proto::{NodeResult, RunResult};

use crate::job::build::Built;

/// Why `run_results.json` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RunResultsError {
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not dbt run results: {source}")]
    NotRunResults {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Every node's outcome from dbt's `run_results.json` (read by `slimci_proto::run_results`, the
/// reader the coordinator's timeline shares).
pub fn read_run_results(path: &Path) -> Result<Vec<NodeResult>, RunResultsError> {
    let bytes = std::fs::read(path).map_err(|source| RunResultsError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    let results = RunResults::parse(&bytes).map_err(|source| RunResultsError::NotRunResults {
        path: path.to_owned(),
        source,
    })?;
    Ok(results
        .results
        .into_iter()
        .map(RunResultEntry::into_node_result)
        .collect())
}

#[derive(Deserialize)]
struct Manifest {
    nodes: HashMap<String, ManifestNode>,
}

#[derive(Deserialize)]
struct ManifestNode {
    #[serde(default)]
    depends_on: DependsOn,
}

#[derive(Deserialize, Default)]
struct DependsOn {
    #[serde(default)]
    nodes: Vec<String>,
}

/// The parents of the built nodes that were not built themselves: what `--defer` read from
/// production. Sources are not counted; they are the same for every target.
pub fn read_deferred(manifest: &Path, nodes: &[NodeResult]) -> Vec<String> {
    let Ok(bytes) = std::fs::read(manifest) else {
        return Vec::new();
    };
    let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes) else {
        return Vec::new();
    };
    let selected: HashSet<&str> = nodes.iter().map(|node| node.unique_id.as_str()).collect();
    let mut deferred: BTreeSet<String> = BTreeSet::new();
    for id in &selected {
        let Some(node) = manifest.nodes.get(*id) else {
            continue;
        };
        for parent in &node.depends_on.nodes {
            let buildable = ["model.", "seed.", "snapshot."]
                .iter()
                .any(|prefix| parent.starts_with(prefix));
            if buildable && !selected.contains(parent.as_str()) {
                deferred.insert(parent.clone());
            }
        }
    }
    deferred.into_iter().collect()
}

/// The run's message after a build that exited by itself: none for success, the failed nodes
/// for failures, the exit code otherwise; a limit the build hit (`limit_note`) comes first.
pub fn build_message(
    built: Built,
    nodes: &[NodeResult],
    limit_note: Option<&str>,
    dbt_error: Option<&str>,
) -> Option<String> {
    let message = match (built.result, dbt_error) {
        (RunResult::Success, _) => return None,
        (RunResult::Failed, _) => failure_summary(nodes),
        (_, Some(error)) => format!(
            "dbt stopped with an error (exit code {}): {error}",
            built.dbt_exit_code
        ),
        (_, None) => format!("dbt exited with code {}", built.dbt_exit_code),
    };
    Some(match limit_note {
        Some(note) => format!("{note}; {message}"),
        None => message,
    })
}

/// dbt's own account of the error that stopped it (its `Encountered an error:` event), from
/// its JSON log file, on one line; none if it logged none.
pub fn dbt_error(dbt_log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dbt_log).ok()?;
    let message = text
        .lines()
        .rev()
        .filter(|line| line.starts_with('{') && line.contains("MainEncounteredError"))
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find_map(|event| event["info"]["msg"].as_str().map(str::to_owned))?;
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && *line != "Encountered an error:")
        .collect();
    (!lines.is_empty()).then(|| lines.join(" / "))
}

/// "2 of 21 nodes failed: test.shop.x (Got 5 results, configured to fail if != 0), ..."
pub fn failure_summary(nodes: &[NodeResult]) -> String {
    let failed: Vec<&NodeResult> = nodes
        .iter()
        .filter(|node| slimci_client::is_failure(node))
        .collect();
    if failed.is_empty() {
        return "dbt reported failures".to_owned();
    }
    let names: Vec<String> = failed
        .iter()
        .take(5)
        .map(|node| match &node.message {
            Some(message) => format!(
                "{} ({})",
                node.unique_id,
                message.lines().next().unwrap_or_default()
            ),
            None => node.unique_id.clone(),
        })
        .collect();
    let more = if failed.len() > 5 {
        format!(", and {} more", failed.len() - 5)
    } else {
        String::new()
    };
    format!(
        "{} of {} nodes failed: {}{more}",
        failed.len(),
        nodes.len(),
        names.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_results_become_node_results() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run_results.json");
        std::fs::write(
            &path,
            r#"{"metadata": {}, "results": [
                {"unique_id": "model.shop.stg_orders", "status": "success", "execution_time": 0.25, "message": "OK", "failures": null, "relation_name": "\"pr_shop_1\".\"main\".\"stg_orders\"", "timing": [
                    {"name": "compile", "started_at": "2026-01-02T03:04:05.100000Z", "completed_at": "2026-01-02T03:04:05.150000Z"},
                    {"name": "execute", "started_at": "2026-01-02T03:04:05.160000Z", "completed_at": "2026-01-02T03:04:05.350000Z"}]},
                {"unique_id": "test.shop.accepted_values_x", "status": "fail", "execution_time": 0.1, "message": "Got 5 results, configured to fail if != 0", "failures": 5}
            ]}"#,
        )
        .unwrap();
        let nodes = read_run_results(&path).unwrap();
        assert_eq!(nodes[0].resource_type, "model");
        assert_eq!(
            nodes[0].relation.as_deref(),
            Some("\"pr_shop_1\".\"main\".\"stg_orders\"")
        );
        assert_eq!(nodes[1].failures, Some(5));
        // The node's span runs from its first step's start to its last step's end.
        let at = |text: &str| Some(text.parse::<chrono::DateTime<chrono::Utc>>().unwrap());
        assert_eq!(nodes[0].started_at, at("2026-01-02T03:04:05.100Z"));
        assert_eq!(nodes[0].completed_at, at("2026-01-02T03:04:05.350Z"));
        assert_eq!((nodes[1].started_at, nodes[1].completed_at), (None, None));
        assert_eq!(
            failure_summary(&nodes),
            "1 of 2 nodes failed: test.shop.accepted_values_x (Got 5 results, configured to fail if != 0)"
        );
        let failed = Built {
            result: RunResult::Failed,
            dbt_exit_code: 1,
        };
        assert_eq!(
            build_message(failed, &nodes, Some("pids limit: hit"), None).unwrap(),
            "pids limit: hit; 1 of 2 nodes failed: test.shop.accepted_values_x (Got 5 results, configured to fail if != 0)"
        );
    }

    #[test]
    fn missing_or_foreign_run_results_say_which() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run_results.json");
        assert!(matches!(
            read_run_results(&path),
            Err(RunResultsError::Unreadable { .. })
        ));
        std::fs::write(&path, "{}").unwrap();
        let error = read_run_results(&path).unwrap_err();
        assert!(matches!(error, RunResultsError::NotRunResults { .. }));
        assert!(
            error.to_string().contains("is not dbt run results"),
            "{error}"
        );
    }

    #[test]
    fn success_has_no_message_and_errors_name_the_exit_code() {
        let success = Built {
            result: RunResult::Success,
            dbt_exit_code: 0,
        };
        assert_eq!(build_message(success, &[], Some("note"), None), None);
        let error = Built {
            result: RunResult::Error,
            dbt_exit_code: 2,
        };
        assert_eq!(
            build_message(error, &[], None, None).as_deref(),
            Some("dbt exited with code 2")
        );
        assert_eq!(
            build_message(
                error,
                &[],
                None,
                Some("Database Error / connection refused")
            )
            .as_deref(),
            Some("dbt stopped with an error (exit code 2): Database Error / connection refused")
        );
    }

    #[test]
    fn dbts_error_comes_from_its_log_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dbt.log");
        std::fs::write(&log, concat!(
            r#"{"info": {"name": "MainReportVersion", "msg": "Running with dbt=1.11.16"}}"#, "\n",
            r#"{"info": {"name": "MainEncounteredError", "msg": "Encountered an error:\nDatabase Error\n  connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n"}}"#, "\n",
        )).unwrap();
        assert_eq!(
            dbt_error(&log).as_deref(),
            Some(
                r#"Database Error / connection to server at "127.0.0.1", port 1 failed: Connection refused"#
            )
        );
        std::fs::write(&log, "no events\n").unwrap();
        assert_eq!(dbt_error(&log), None);
    }
}
