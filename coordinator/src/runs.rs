//! Requests that change runs, whichever door they came in by (HTTP API, CLI, GitHub webhook):
//! submitting a run with the supersede and dedupe rules, cancelling, tearing down a PR's
//! isolation. The decisions are `rules`; this module applies them to the store and wakes the
//! publisher.

use slimci_client::Trigger;
use slimci_proto::{PrNumber, RunId, RunKind};

use crate::app::AppState;
use crate::config::{Config, RepositoryConfig};
use crate::rules::{self, Admission, CancelDecision, RunStatus, SubmitDecision, ValidRequest};
use crate::store::{NewRun, Run, StoreError, Supersession};
use crate::telemetry::Origin;

/// The run that answers a request, and whether it was made for it.
pub struct Submitted {
    pub run: Run,
    pub created: bool,
}

/// Records a run for a valid request: refuses a CI run without production state (recorded as
/// `error`), answers with the existing run when the same commit is already queued or building,
/// and supersedes the PR's runs of older commits.
pub async fn submit(
    state: &AppState,
    request: ValidRequest,
    trigger: Trigger,
) -> Result<Submitted, StoreError> {
    submit_from(state, request, trigger, &Origin::Request).await
}

/// `submit`, for a run made by `origin` (which its trace shows); `trigger` is who or what
/// asked, recorded with the run.
async fn submit_from(
    state: &AppState,
    request: ValidRequest,
    trigger: Trigger,
    origin: &Origin,
) -> Result<Submitted, StoreError> {
    let requested_at = std::time::SystemTime::now();
    if request.kind == RunKind::Ci
        && let Some(repository) = state.config.repository(request.repository.as_str())
    {
        crate::dbt_cloud::refresh_if_stale(state, repository).await;
    }
    // One submission at a time, so two requests for one PR cannot both miss each other.
    let _serial = state.submit_lock.lock().await;
    let production_state = match request.kind {
        RunKind::Ci => state.store.production_state(&request.repository).await?,
        RunKind::Deploy | RunKind::Teardown | RunKind::Publish => None,
    };
    let repository = state
        .config
        .repository(request.repository.as_str())
        .expect("a valid request names a configured repository");
    let (status, message) = match rules::admit(&request, repository, production_state.is_some()) {
        Admission::Queue => (RunStatus::Queued, None),
        Admission::Refuse(message) => (RunStatus::Error, Some(message)),
    };
    let active: Vec<rules::ActiveRun> = state
        .store
        .active_runs_of(&request.repository, request.kind, request.pr)
        .await?
        .iter()
        .map(Run::active)
        .collect();
    let supersede = match rules::decide_submit(&request, &active) {
        SubmitDecision::Existing(id) => {
            let run = state.store.run(id).await?.expect("an active run exists");
            tracing::info!(run = %id, "the same commit is already queued or building; answering with that run");
            return Ok(Submitted {
                run,
                created: false,
            });
        }
        SubmitDecision::Create { supersede } => supersede,
    };
    let new_run = NewRun {
        id: RunId::new(),
        repository: request.repository,
        kind: request.kind,
        pr: request.pr,
        sha: request.sha,
        fetch_ref: request.fetch_ref,
        isolation: request.isolation,
        timeout_secs: request.timeout_secs,
        production_state,
        status,
        message,
        traceparent: crate::telemetry::new_trace(state),
        trigger,
    };
    state.store.insert_run(&new_run).await?;
    tracing::info!(run = %new_run.id, repository = %new_run.repository, kind = new_run.kind.as_str(), pr = ?new_run.pr.map(|pr| pr.0), status = status.as_str(), "run accepted");
    if status == RunStatus::Queued {
        for old in supersede {
            let supersession = state.store.supersede(old, new_run.id).await?;
            if supersession == Supersession::Unchanged {
                continue;
            }
            state.metrics.supersedes.inc(&[]);
            tracing::info!(run = %old, by = %new_run.id, ?supersession, "superseded");
            let _ = state.changes.send(old);
        }
    }
    state.outbox.notify_one();
    let _ = state.changes.send(new_run.id);
    let run = state.store.run(new_run.id).await?.expect("just inserted");
    crate::telemetry::origin(state, &run, requested_at, origin);
    Ok(Submitted { run, created: true })
}

/// Why a cancel did nothing.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no run {0}")]
    Unknown(RunId),
    #[error("run {id} already ended: {}", status.as_str())]
    AlreadyFinished { id: RunId, status: RunStatus },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Cancels a run: one not started ends now; a building one is stopped by its agent and ends
/// when the agent reports the tree gone.
pub async fn cancel(state: &AppState, id: RunId, reason: &str) -> Result<Run, CancelError> {
    let run = state.store.run(id).await?.ok_or(CancelError::Unknown(id))?;
    let changed = match rules::decide_cancel(run.status) {
        CancelDecision::EndNow => {
            state
                .store
                .end_queued(id, RunStatus::Cancelled, reason)
                .await?
                // Claimed in the meantime: stop it where it runs.
                || state.store.request_cancel(id).await?
        }
        CancelDecision::SignalAgents => state.store.request_cancel(id).await?,
        CancelDecision::AlreadyFinished(status) => {
            return Err(CancelError::AlreadyFinished { id, status });
        }
    };
    if !changed {
        // Already being stopped (a repeated cancel), or it ended in the meantime.
        return Ok(state.store.run(id).await?.expect("exists"));
    }
    tracing::info!(run = %id, %reason, "cancel requested");
    state.metrics.cancels.inc(&[]);
    state.outbox.notify_one();
    let _ = state.changes.send(id);
    Ok(state.store.run(id).await?.expect("exists"))
}

/// Cancels every unfinished CI run of one PR (it was closed or became a draft).
pub async fn cancel_pull_request(
    state: &AppState,
    repository: &RepositoryConfig,
    pr: PrNumber,
    reason: &str,
) -> Result<usize, StoreError> {
    let mut cancelled = 0;
    for run in state
        .store
        .active_runs_of(&repository.name, RunKind::Ci, Some(pr))
        .await?
    {
        match cancel(state, run.id, reason).await {
            Ok(_) => cancelled += 1,
            Err(CancelError::Store(error)) => return Err(error),
            Err(_) => {}
        }
    }
    Ok(cancelled)
}

/// Queues a teardown run that drops PR `pr`'s isolation (and nothing else), asked for by
/// `trigger`, at a request or because the sweeper found it left behind (`origin`).
pub async fn teardown(
    state: &AppState,
    repository: &RepositoryConfig,
    pr: PrNumber,
    trigger: Trigger,
    origin: &Origin,
) -> Result<Submitted, StoreError> {
    let timeout = run_timeout_secs(&state.config, repository);
    submit_from(
        state,
        rules::teardown_request(repository, pr, timeout),
        trigger,
        origin,
    )
    .await
}

/// How long a run of `repository` may take: its own limit, or the coordinator's.
pub fn run_timeout_secs(config: &Config, repository: &RepositoryConfig) -> u64 {
    repository
        .run_timeout_secs
        .unwrap_or(config.limits.run_timeout_secs)
}
