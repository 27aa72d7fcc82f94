//! Drops isolations a missed `closed` webhook left behind: every `interval_secs`, each PR whose
//! CI builds all ended longer than `max_age_secs` ago and that has no teardown since is looked
//! at; if its PR is closed (as GitHub says now, or as the last webhook said), or unknown to
//! GitHub and to us (built from another CI system), a teardown run is queued. Each decision is
//! logged, and a teardown's trace starts with the sweeper's finding (`telemetry::Origin::Sweep`:
//! why, and its question to GitHub).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use slimci_client::Trigger;
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::github::GitHub;
use crate::runs;
use crate::telemetry::{Origin, SweepFinding};

pub async fn sweeper_loop(
    state: Arc<AppState>,
    github: Option<Arc<GitHub>>,
    shutdown: CancellationToken,
) {
    let interval = state.config.sweeper.interval_secs;
    if interval == 0 {
        return;
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(interval)) => {}
        }
        if let Err(error) = sweep(&state, github.as_deref()).await {
            tracing::warn!(%error, "sweeper failed; will try again");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// One pass. Returns the teardown runs it queued.
pub async fn sweep(state: &AppState, github: Option<&GitHub>) -> Result<usize, SweepError> {
    let cutoff = crate::store::now_ms() - (state.config.sweeper.max_age_secs as i64) * 1000;
    let mut queued = 0;
    for candidate in state.store.sweep_candidates(cutoff).await? {
        let started = SystemTime::now();
        let (repository_name, pr) = (candidate.repository, candidate.pr);
        let Some(repository) = state.config.repository(repository_name.as_str()).cloned() else {
            continue;
        };
        let recorded = state.store.pull_request(&repository_name, pr).await?;
        let mut asked_github = None;
        let on_github = match (github, &repository.github) {
            (Some(github), Some(full_name)) => {
                let asked = SystemTime::now();
                let answer = github.pull_request_state(full_name, pr).await;
                asked_github = Some((asked, SystemTime::now()));
                match answer {
                    Ok(open_or_closed) => Some(open_or_closed),
                    Err(error) => {
                        tracing::warn!(%error, repository = %repository_name, %pr, "sweeper cannot ask GitHub about the PR; skipping it this time");
                        continue;
                    }
                }
            }
            _ => None,
        };
        let reason = match (on_github, &recorded) {
            (Some(Some(github_state)), _) if github_state == "open" => continue,
            (Some(Some(_)), _) => "closed on GitHub",
            (Some(None), _) => "unknown to GitHub",
            (None, Some(pull)) if pull.open => continue,
            (None, Some(_)) => "closed",
            (None, None) => "unknown (never seen in a webhook)",
        };
        let age_hours = (crate::store::now_ms() - candidate.last_finished_ms) as f64 / 3_600_000.0;
        let finding = SweepFinding {
            started,
            reason,
            asked_github,
            last_build_hours: age_hours,
        };
        let teardown = runs::teardown(
            state,
            &repository,
            pr,
            Trigger::Sweeper,
            &Origin::Sweep(finding),
        )
        .await?;
        queued += 1;
        tracing::info!(
            repository = %repository_name,
            %pr,
            isolation = %slimci_proto::IsolationName::for_pr(&repository_name, pr),
            reason,
            last_build_hours_ago = format!("{age_hours:.1}"),
            run = %teardown.run.id,
            "sweeper: dropping a left-behind PR isolation"
        );
    }
    Ok(queued)
}
