//! The notifier: compares each run's status with what GitHub was last told
//! (`runs.github_reported`) and catches up, so a coordinator restart or a GitHub outage delays
//! reports but never loses or blocks them; builds never wait for GitHub.

use std::sync::Arc;
use std::time::Duration;

use slimci_proto::RunKind;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::client::{GitHub, GitHubError};
use super::render::{comment_body, commit_status};
use crate::app::AppState;
use crate::store::Run;

/// Reports runs to GitHub until shutdown.
pub async fn notifier_loop(state: Arc<AppState>, github: Arc<GitHub>, shutdown: CancellationToken) {
    let mut changes = state.changes.subscribe();
    loop {
        if let Err(error) = report_pending(&state, &github).await {
            if error.is_from_github() {
                tracing::warn!(%error, "GitHub reporting failed; will try again");
                state.metrics.github_failures.inc(&["transient"]);
            } else {
                tracing::error!(%error, "cannot read or record what GitHub was told; will try again");
            }
        }
        state
            .metrics
            .github_retries
            .add(&[], github.take_retries() as f64);
        let wait = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(wait);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = &mut wait => {}
            change = changes.recv() => {
                if matches!(change, Err(broadcast::error::RecvError::Closed)) {
                    return;
                }
                // Let a burst of changes settle into one round.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while changes.try_recv().is_ok() {}
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ReportError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    GitHub(#[from] GitHubError),
}

impl ReportError {
    /// GitHub (or the way to it) failed, not our database: what
    /// `slimci_github_report_failures_total` counts.
    fn is_from_github(&self) -> bool {
        matches!(self, ReportError::GitHub(_))
    }
}

async fn report_pending(state: &AppState, github: &GitHub) -> Result<(), ReportError> {
    for run in state.store.runs_to_report(200).await? {
        let started = std::time::SystemTime::now();
        let reported = report_run(state, github, &run).await;
        crate::telemetry::github_report(
            state,
            &run,
            started,
            reported.as_ref().err().map(ToString::to_string),
        );
        match reported {
            Ok(()) => {
                tracing::info!(run = %run.id, status = run.status.as_str(), "reported to GitHub")
            }
            // One run GitHub refuses for good (an unknown commit, a repository the token cannot
            // see) must not hold up the others: say so once and move on.
            Err(ReportError::GitHub(error)) if error.is_permanent() => {
                tracing::warn!(run = %run.id, status = run.status.as_str(), %error, "GitHub refused this report; not retrying it");
                state.metrics.github_failures.inc(&["permanent"]);
            }
            // GitHub is down or limiting us: stop this round, the next one starts over.
            Err(error) => return Err(error),
        }
        state.store.set_reported(run.id, run.status).await?;
    }
    Ok(())
}

/// Sets the commit status of `run` and, for CI runs, the PR's comment.
async fn report_run(state: &AppState, github: &GitHub, run: &Run) -> Result<(), ReportError> {
    let Some(full_name) = state
        .config
        .repository(run.repository.as_str())
        .and_then(|repository| repository.github.clone())
    else {
        return Ok(());
    };
    let Some(sha) = &run.sha else { return Ok(()) };
    // People follow the links: the run's page, not the API.
    let page_url = state.run_url(run.id);
    let nodes = state.store.nodes(run.id).await?;
    let position = state.store.queue_position(run).await?;
    github
        .set_status(
            &full_name,
            sha.as_str(),
            &commit_status(run, &nodes, position, &page_url),
        )
        .await?;
    if let (RunKind::Ci, Some(pr)) = (run.kind, run.pr) {
        // The comment always shows the PR's latest run, whichever run changed.
        let latest = state
            .store
            .latest_ci_run(&run.repository, pr)
            .await?
            .unwrap_or(run.clone());
        let latest_nodes = if latest.id == run.id {
            nodes
        } else {
            state.store.nodes(latest.id).await?
        };
        let latest_page = state.run_url(latest.id);
        let body = comment_body(
            &latest,
            &latest_nodes,
            &latest_page,
            &format!("{latest_page}#log"),
        );
        let known = state.store.comment_id(&run.repository, pr).await?;
        let id = github.upsert_comment(&full_name, pr, &body, known).await?;
        if known != Some(id) {
            state
                .store
                .set_comment_id(&run.repository, pr, Some(id))
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_githubs_errors_are_report_failures() {
        let store = ReportError::from(crate::store::StoreError::Corrupt("run status ?".into()));
        assert!(!store.is_from_github());
        let github = ReportError::from(GitHubError::Status {
            method: reqwest::Method::POST,
            path: "/repos/acme/shop/statuses/abc".into(),
            status: reqwest::StatusCode::BAD_GATEWAY,
            body: String::new(),
        });
        assert!(github.is_from_github());
    }
}
