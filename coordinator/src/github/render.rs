//! What slimci tells GitHub about a run, as pure functions: the commit status (state and a
//! description under GitHub's 140 characters) and the PR comment (under GitHub's size limit).

use slimci_client::{Summary, is_failure, summarize};
use slimci_proto::{NodeResult, RunKind};

use crate::rules::RunStatus;
use crate::store::Run;

/// Hidden marker that identifies slimci's comment on a PR.
pub const COMMENT_MARKER: &str = "<!-- slimci:summary -->";
/// GitHub refuses comments over 65,536 characters; stay well under.
const MAX_COMMENT_CHARS: usize = 60_000;
/// GitHub truncates status descriptions at 140 characters.
const MAX_DESCRIPTION_CHARS: usize = 140;

/// A commit status as GitHub takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitStatus {
    pub state: &'static str,
    pub description: String,
    pub target_url: String,
}

fn truncate(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(limit.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn seconds(run: &Run) -> Option<u64> {
    Some(((run.finished_ms? - run.started_ms?).max(0) as f64 / 1000.0).round() as u64)
}

/// "14 built, 2 tests failed, 38 deferred, 92 s".
pub fn result_line(summary: &Summary, deferred: usize, seconds: Option<u64>) -> String {
    let mut parts = vec![format!("{} built", summary.built)];
    if summary.tests_failed > 0 {
        parts.push(format!("{} tests failed", summary.tests_failed));
    } else {
        parts.push(format!("{} tests passed", summary.tests_passed));
    }
    if summary.errored > 0 {
        parts.push(format!("{} errors", summary.errored));
    }
    if summary.skipped > 0 {
        parts.push(format!("{} skipped", summary.skipped));
    }
    parts.push(format!("{deferred} deferred"));
    if let Some(seconds) = seconds {
        parts.push(format!("{seconds} s"));
    }
    parts.join(", ")
}

/// The commit status for a run in its current state.
pub fn commit_status(
    run: &Run,
    nodes: &[NodeResult],
    queue_position: Option<u32>,
    run_url: &str,
) -> CommitStatus {
    let summary = summarize(nodes);
    let line = result_line(&summary, run.deferred.len(), seconds(run));
    let (state, description) = match run.status {
        RunStatus::Queued => (
            "pending",
            match queue_position {
                Some(position) => format!("queued, position {position}"),
                None => "queued".to_owned(),
            },
        ),
        RunStatus::Running if run.superseded_by.is_some() => {
            ("pending", "superseded; stopping the build".to_owned())
        }
        RunStatus::Running => (
            "pending",
            format!("building on {}", run.agent.as_deref().unwrap_or("an agent")),
        ),
        RunStatus::Success => ("success", line),
        RunStatus::Failed => ("failure", line),
        RunStatus::Superseded => (
            "error",
            "superseded by a newer commit of this pull request".to_owned(),
        ),
        RunStatus::Cancelled => (
            "error",
            format!(
                "cancelled: {}",
                run.message.as_deref().unwrap_or("by request")
            ),
        ),
        RunStatus::TimedOut => ("error", format!("timed out after {} s", run.timeout_secs)),
        RunStatus::Error => (
            "error",
            run.message.clone().unwrap_or_else(|| "error".to_owned()),
        ),
    };
    let description = match run.kind {
        RunKind::Deploy => format!("deploy: {description}"),
        _ => description,
    };
    CommitStatus {
        state,
        description: truncate(&description, MAX_DESCRIPTION_CHARS),
        target_url: run_url.to_owned(),
    }
}

fn icon(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Success => "✅",
        RunStatus::Failed => "❌",
        RunStatus::Queued | RunStatus::Running => "⏳",
        _ => "⚠️",
    }
}

fn short(text: &str) -> &str {
    &text[..12.min(text.len())]
}

/// The PR comment for the PR's latest run. Bounded by GitHub's size limit: lists are cut with a
/// link to the full run.
pub fn comment_body(run: &Run, nodes: &[NodeResult], run_url: &str, logs_url: &str) -> String {
    use std::fmt::Write;
    let summary = summarize(nodes);
    let sha = run
        .sha
        .as_ref()
        .map(|sha| short(sha.as_str()).to_owned())
        .unwrap_or_default();
    let mut body = String::new();
    let _ = writeln!(body, "{COMMENT_MARKER}");
    let _ = writeln!(
        body,
        "### {} slimci: dbt Slim CI {} for `{sha}`",
        icon(run.status),
        run.status.as_str()
    );
    let _ = writeln!(body);
    match run.status {
        RunStatus::Queued | RunStatus::Running => {
            let _ = writeln!(
                body,
                "Building `state:modified+` of `{sha}`… this comment updates when it ends."
            );
        }
        _ => {
            let _ = writeln!(
                body,
                "**{}**",
                result_line(&summary, run.deferred.len(), seconds(run))
            );
        }
    }
    if let Some(message) = &run.message {
        let _ = writeln!(body, "\n> {}", message.lines().next().unwrap_or_default());
    }
    if let Some(stamp) = &run.compared_against {
        let _ = writeln!(
            body,
            "\nCompared against production state: deploy run `{}` of commit `{}`.",
            stamp.deploy_run_id,
            short(stamp.sha.as_str())
        );
    }
    let failures: Vec<&NodeResult> = nodes.iter().filter(|node| is_failure(node)).collect();
    let mut tail = String::new();
    let _ = writeln!(
        tail,
        "\n[Full run]({run_url}) · [log]({logs_url}) · run `{}`",
        run.id
    );
    let budget = MAX_COMMENT_CHARS.saturating_sub(body.len() + tail.len() + 200);
    let mut sections = String::new();
    if !failures.is_empty() {
        let _ = writeln!(
            sections,
            "\n#### Failures\n\n| node | status | message |\n|---|---|---|"
        );
        for node in &failures {
            let message = node
                .message
                .as_deref()
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or_default()
                .replace('|', "\\|");
            let _ = writeln!(
                sections,
                "| `{}` | {} | {} |",
                node.unique_id,
                node.status,
                truncate(&message, 300)
            );
        }
    }
    let built: Vec<&NodeResult> = nodes
        .iter()
        .filter(|node| node.status == "success")
        .collect();
    if !built.is_empty() {
        let _ = writeln!(
            sections,
            "\n<details><summary>{} nodes built</summary>\n",
            built.len()
        );
        for node in &built {
            let _ = writeln!(
                sections,
                "- `{}` ({:.1} s)",
                node.unique_id, node.execution_time_s
            );
        }
        let _ = writeln!(sections, "\n</details>");
    }
    if !run.deferred.is_empty() {
        let _ = writeln!(
            sections,
            "\n<details><summary>{} parents deferred to production</summary>\n",
            run.deferred.len()
        );
        for parent in &run.deferred {
            let _ = writeln!(sections, "- `{parent}`");
        }
        let _ = writeln!(sections, "\n</details>");
    }
    if sections.len() > budget {
        let mut cut: String = sections.chars().take(budget).collect();
        if let Some(line_end) = cut.rfind('\n') {
            cut.truncate(line_end);
        }
        sections = format!("{cut}\n\n…truncated: the full list is in the [run]({run_url}).\n");
    }
    body.push_str(&sections);
    body.push_str(&tail);
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimci_proto::{Attempt, PrNumber, RepoName, RunId, Sha};

    fn run(status: RunStatus) -> Run {
        Run {
            id: RunId::new(),
            repository: RepoName::parse("shop").unwrap(),
            kind: RunKind::Ci,
            pr: Some(PrNumber(4)),
            sha: Some(Sha::parse(&"ab".repeat(20)).unwrap()),
            fetch_ref: "refs/pull/4/head".into(),
            isolation: None,
            status,
            message: None,
            attempt: Attempt(1),
            agent: Some("vm-1".into()),
            created_ms: 0,
            queued_ms: 0,
            started_ms: Some(1_000),
            finished_ms: Some(93_000),
            timeout_secs: 600,
            compared_against: Some(crate::store::ProductionStamp {
                deploy_run_id: RunId::new(),
                sha: Sha::parse(&"cd".repeat(20)).unwrap(),
                manifest_sha256: "ef".repeat(32),
            }),
            progress_done: 0,
            progress_total: 0,
            last_seq: 0,
            cancel_requested: false,
            dbt_exit_code: Some(1),
            superseded_by: None,
            deferred: (0..38).map(|n| format!("model.shop.parent_{n}")).collect(),
            github_reported: None,
            dispatched: true,
            sandbox: None,
            caches: None,
            traceparent: None,
            trigger: None,
            backend: None,
            backend_reason: None,
            dbt_cloud_run_id: None,
        }
    }

    fn node(id: &str, status: &str, message: Option<&str>) -> NodeResult {
        NodeResult {
            unique_id: id.into(),
            resource_type: id.split('.').next().unwrap().into(),
            status: status.into(),
            execution_time_s: 0.5,
            message: message.map(Into::into),
            failures: None,
            relation: None,
            adapter_response: None,
            started_at: None,
            completed_at: None,
        }
    }

    #[test]
    fn statuses_say_what_happened() {
        let mut nodes: Vec<NodeResult> = (0..14)
            .map(|n| node(&format!("model.shop.m{n}"), "success", None))
            .collect();
        nodes.push(node("test.shop.t1", "fail", Some("Got 5 results")));
        nodes.push(node("test.shop.t2", "fail", Some("Got 1 result")));
        let status = commit_status(&run(RunStatus::Failed), &nodes, None, "http://c/r");
        assert_eq!(status.state, "failure");
        assert_eq!(
            status.description,
            "14 built, 2 tests failed, 38 deferred, 92 s"
        );
        assert_eq!(
            commit_status(&run(RunStatus::Queued), &[], Some(3), "u").description,
            "queued, position 3"
        );
        let superseded = commit_status(&run(RunStatus::Superseded), &[], None, "u");
        assert_eq!(
            (
                superseded.state,
                superseded.description.contains("superseded")
            ),
            ("error", true)
        );
        let long = Run {
            message: Some("x".repeat(500)),
            ..run(RunStatus::Error)
        };
        assert_eq!(
            commit_status(&long, &[], None, "u")
                .description
                .chars()
                .count(),
            140
        );
    }

    #[test]
    fn the_comment_has_the_marker_failures_and_production_state() {
        let nodes = vec![
            node("model.shop.a", "success", None),
            node("test.shop.t", "fail", Some("Got 5 | results")),
        ];
        let body = comment_body(
            &run(RunStatus::Failed),
            &nodes,
            "http://c/r",
            "http://c/r/logs",
        );
        assert!(body.starts_with(COMMENT_MARKER));
        assert!(
            body.contains("| `test.shop.t` | fail | Got 5 \\| results |"),
            "{body}"
        );
        assert!(body.contains("38 parents deferred to production"));
        assert!(body.contains("Compared against production state: deploy run"));
        assert!(body.contains("[Full run](http://c/r)"));
    }

    #[test]
    fn the_comment_stays_under_githubs_limit() {
        let nodes: Vec<NodeResult> = (0..20_000)
            .map(|n| {
                node(
                    &format!("test.shop.a_rather_long_test_name_{n}"),
                    "fail",
                    Some(&"why ".repeat(50)),
                )
            })
            .collect();
        let body = comment_body(
            &run(RunStatus::Failed),
            &nodes,
            "http://c/r",
            "http://c/r/logs",
        );
        assert!(body.chars().count() < 65_536, "{}", body.len());
        assert!(body.contains("…truncated: the full list is in the [run](http://c/r)"));
        assert!(
            body.contains("[Full run](http://c/r)"),
            "the link to the full run survives the cut"
        );
    }
}
