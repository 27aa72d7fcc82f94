//! Runs for people: the table of `slimci runs`, the summary after a run, a repository's
//! production state, the exit code.

use std::process::ExitCode;

use slimci_client::{AgentView, ProductionStateView, RunStatus, RunView, is_failure};
use slimci_proto::RunKind;

/// 0 success, 1 the build failed (models or tests), 2 anything else.
pub fn exit_code(status: RunStatus) -> ExitCode {
    match status {
        RunStatus::Success => ExitCode::SUCCESS,
        RunStatus::Failed => ExitCode::from(1),
        _ => ExitCode::from(2),
    }
}

fn short(sha: &str) -> &str {
    &sha[..12.min(sha.len())]
}

pub fn print_runs(runs: &[RunView]) {
    println!(
        "{:<36}  {:<6}  {:<16}  {:>5}  {:<12}  {:<10}  {:>8}  {:<16}  CREATED",
        "ID", "KIND", "REPOSITORY", "PR", "SHA", "STATUS", "SECONDS", "BACKEND"
    );
    for run in runs {
        println!(
            "{:<36}  {:<6}  {:<16}  {:>5}  {:<12}  {:<10}  {:>8}  {:<16}  {}",
            run.id.to_string(),
            run.kind.as_str(),
            run.repository,
            run.pr
                .map(|pr| pr.to_string())
                .unwrap_or_else(|| "-".into()),
            run.sha.as_deref().map(short).unwrap_or("-"),
            run.status.as_str(),
            run.duration_s
                .map(|s| format!("{s:.1}"))
                .unwrap_or_else(|| "-".into()),
            backend(run),
            run.created_at,
        );
    }
}

/// Where a run builds: `fleet`, or `dbt_cloud` with its Cloud run; `-` while undecided.
fn backend(run: &RunView) -> String {
    match (run.backend, run.dbt_cloud_run_id) {
        (Some(backend @ slimci_client::Backend::DbtCloud), Some(cloud_run)) => {
            format!("{backend}:{cloud_run}")
        }
        (Some(backend), _) => backend.to_string(),
        (None, _) => "-".to_owned(),
    }
}

/// The table of `slimci agents`.
pub fn print_agents(agents: &[AgentView]) {
    if agents.is_empty() {
        println!("no agent has reported to this coordinator yet");
        return;
    }
    println!(
        "{:<24}  {:<8}  {:<8}  {:>5}  {:>4}  {:<24}  RUNS",
        "AGENT", "STATE", "VERSION", "SLOTS", "BUSY", "LAST HEARTBEAT"
    );
    for agent in agents {
        println!(
            "{:<24}  {:<8}  {:<8}  {:>5}  {:>4}  {:<24}  {}",
            agent.name,
            agent.state,
            agent.version.as_deref().unwrap_or("-"),
            agent
                .slots
                .map_or_else(|| "-".to_owned(), |slots| slots.to_string()),
            agent.busy_slots,
            agent.last_heartbeat,
            if agent.current_runs.is_empty() {
                "-".to_owned()
            } else {
                agent
                    .current_runs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
        );
    }
}

pub fn print_summary(run: &RunView) {
    let what = match (run.kind, run.pr) {
        (RunKind::Ci, Some(pr)) => format!("ci of {} PR #{pr}", run.repository),
        (RunKind::Teardown, Some(pr)) => format!("teardown of {} PR #{pr}", run.repository),
        (RunKind::Publish, _) => format!("manifest published for {}", run.repository),
        _ => format!("deploy of {}", run.repository),
    };
    let sha = run
        .sha
        .as_deref()
        .map(|sha| format!(" at {}", short(sha)))
        .unwrap_or_default();
    let duration = run
        .duration_s
        .map(|s| format!(" in {s:.1} s"))
        .unwrap_or_default();
    println!();
    println!("run {} — {what}{sha}: {}{duration}", run.id, run.status);
    if let Some(reason) = &run.backend_reason {
        println!("built on {}: {reason}", backend(run));
    }
    if let Some(state) = &run.production_state {
        println!(
            "compared against production state of deploy {} (commit {})",
            state.deploy_run_id,
            short(&state.sha)
        );
    }
    if let Some(caches) = &run.caches {
        let mut used: Vec<String> = [
            ("git", &caches.git),
            ("state", &caches.state),
            ("deps", &caches.deps),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some(format!("{name} {}", value.as_deref()?)))
        .collect();
        if let Some(parse) = &caches.parse {
            used.push(match (&caches.parse_reason, caches.parse_from) {
                (Some(reason), _) => format!("{parse} parse ({reason})"),
                (None, Some(deploy)) => format!("{parse} parse from deploy {deploy}"),
                (None, None) => format!("{parse} parse"),
            });
        }
        if !used.is_empty() {
            println!("caches: {}", used.join(", "));
        }
    }
    if let Some(message) = &run.message {
        println!("{message}");
    }
    if let Some(position) = run.queue_position {
        println!("waiting to start: position {position} in line");
    }
    if let Some(summary) = run
        .summary
        .as_ref()
        .filter(|_| run.kind != RunKind::Publish)
    {
        println!();
        println!(
            "  {:>8}  {:>6}  {:>6}  {:>6}  {:>6}  {:>6}  {:>7}",
            "selected", "built", "passed", "failed", "warned", "errors", "skipped"
        );
        println!(
            "  {:>8}  {:>6}  {:>6}  {:>6}  {:>6}  {:>6}  {:>7}",
            summary.selected,
            summary.built,
            summary.tests_passed,
            summary.tests_failed,
            summary.warned,
            summary.errored,
            summary.skipped
        );
    }
    let failures: Vec<_> = run
        .nodes
        .iter()
        .flatten()
        .filter(|node| is_failure(node))
        .collect();
    if !failures.is_empty() {
        println!();
        println!("failures:");
        for node in failures {
            println!(
                "  {} {}: {}",
                node.status.to_uppercase(),
                node.unique_id,
                node.message
                    .as_deref()
                    .unwrap_or_default()
                    .lines()
                    .next()
                    .unwrap_or_default()
            );
        }
    }
}

/// A repository's production state, and which run made it.
pub fn print_production_state(production: &ProductionStateView) {
    let made_by = match production.run_kind {
        RunKind::Publish => "published manifest",
        _ => "deploy",
    };
    println!(
        "production state of {}: {made_by} {}",
        production.repository, production.deploy_run_id
    );
    println!("  commit           {}", production.sha);
    println!("  manifest sha256  {}", production.manifest_sha256);
    println!("  manifest         {}", production.manifest_url);
    println!("  since            {}", production.updated_at);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_status() {
        assert_eq!(exit_code(RunStatus::Success), ExitCode::SUCCESS);
        assert_eq!(exit_code(RunStatus::Failed), ExitCode::from(1));
        assert_eq!(exit_code(RunStatus::Cancelled), ExitCode::from(2));
    }
}
