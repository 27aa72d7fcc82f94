//! The API's answers made from the store's rows: a run's short and full view, its artifacts, a
//! repository's production state. The JSON types are `slimci_client`'s, shared with clients.

use chrono::SecondsFormat;
use slimci_client::{
    ArtifactView, PhaseView, ProductionStateView, Progress, RunView, StateView, Waiting,
};
use slimci_proto::{RepoName, RunId, Topology};

use super::ApiResult;
use crate::app::AppState;
use crate::store::{ArtifactRecord, ProductionState, Run, now_ms};

/// A time as the API spells it: RFC 3339 UTC with milliseconds.
fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn seconds(from: i64, to: i64) -> f64 {
    (to - from).max(0) as f64 / 1000.0
}

fn artifact_view(state: &AppState, run: RunId, artifact: ArtifactRecord) -> ArtifactView {
    ArtifactView {
        url: state.artifact_url(run, &artifact.name),
        name: artifact.name,
        size: artifact.size,
        sha256: artifact.sha256,
    }
}

pub fn artifact_views(
    state: &AppState,
    run: RunId,
    artifacts: Vec<ArtifactRecord>,
) -> Vec<ArtifactView> {
    artifacts
        .into_iter()
        .map(|artifact| artifact_view(state, run, artifact))
        .collect()
}

/// The short view, as `GET /api/v1/runs` lists it.
pub fn run_view(state: &AppState, run: Run) -> RunView {
    let production_state = run.compared_against.as_ref().map(|stamp| StateView {
        deploy_run_id: stamp.deploy_run_id,
        sha: stamp.sha.to_string(),
        manifest_sha256: stamp.manifest_sha256.clone(),
    });
    let trace_id = crate::telemetry::trace_id(&run);
    RunView {
        url: state.run_url(run.id),
        id: run.id,
        repository: run.repository.to_string(),
        kind: run.kind,
        pr: run.pr.map(|pr| pr.0),
        sha: run.sha.map(|sha| sha.to_string()),
        git_ref: run.fetch_ref,
        isolation: run.isolation.map(|name| name.to_string()),
        status: run.status,
        message: run.message,
        attempt: run.attempt,
        agent: run.agent,
        created_at: time(run.created_ms),
        started_at: run.started_ms.map(time),
        finished_at: run.finished_ms.map(time),
        duration_s: run
            .started_ms
            .map(|start| seconds(start, run.finished_ms.unwrap_or_else(now_ms))),
        timeout_secs: run.timeout_secs,
        cancel_requested: run.cancel_requested,
        queue_position: None,
        superseded_by: run.superseded_by,
        deferred: run.deferred,
        production_state,
        progress: Progress {
            done: run.progress_done,
            total: run.progress_total,
        },
        dbt_exit_code: run.dbt_exit_code,
        sandbox: run
            .sandbox
            .as_deref()
            .and_then(|json| serde_json::from_str(json).ok()),
        caches: run
            .caches
            .as_deref()
            .and_then(|json| serde_json::from_str(json).ok()),
        waiting: None,
        trace_id,
        trigger: run.trigger,
        // Runs of repositories without routing build on the fleet once dispatched.
        backend: run
            .backend
            .or(run.dispatched.then_some(slimci_client::Backend::Fleet)),
        backend_reason: run.backend_reason,
        dbt_cloud_run_id: run.dbt_cloud_run_id,
        summary: None,
        phases: None,
        nodes: None,
        artifacts: None,
    }
}

/// The full view, as `GET /api/v1/runs/{id}` answers: with phases, nodes, summary, artifacts,
/// and, while queued, its place in line and why it waits.
pub async fn full_run_view(state: &AppState, run: Run) -> ApiResult<RunView> {
    let id = run.id;
    let mut phases = state.store.phases(id).await?;
    phases.sort_by_key(|phase| (phase.attempt, crate::store::phase_order(&phase.phase)));
    let nodes = state.store.nodes(id).await?;
    let artifacts = state.store.artifacts(id).await?;
    let queue_position = state.store.queue_position(&run).await?;
    let queued_for_ms = now_ms() - run.created_ms;
    let mut view = run_view(state, run);
    view.queue_position = queue_position;
    view.waiting = queue_position.map(|position| Waiting {
        jobs_queue: Topology::new(&state.config.amqp.prefix).jobs_queue(),
        agents_consuming: state.fleet.agents_consuming(),
        runs_ahead: position.saturating_sub(1),
        queued_for_secs: u64::try_from(queued_for_ms / 1000).unwrap_or_default(),
    });
    view.summary = Some(slimci_client::summarize(&nodes));
    view.phases = Some(
        phases
            .into_iter()
            .map(|phase| PhaseView {
                attempt: phase.attempt,
                started_at: time(phase.started_ms),
                finished_at: phase.finished_ms.map(time),
                duration_s: phase.finished_ms.map(|end| seconds(phase.started_ms, end)),
                phase: phase.phase,
                ok: phase.ok,
            })
            .collect(),
    );
    view.nodes = Some(nodes);
    view.artifacts = Some(artifact_views(state, id, artifacts));
    Ok(view)
}

/// A repository's production state, if it has one.
pub async fn production_state_view(
    state: &AppState,
    name: &RepoName,
) -> ApiResult<Option<ProductionStateView>> {
    Ok(state
        .store
        .production_state(name)
        .await?
        .map(|production| production_view(state, production)))
}

/// A production state as the API shows it.
pub fn production_view(state: &AppState, production: ProductionState) -> ProductionStateView {
    ProductionStateView {
        manifest_url: state.artifact_url(production.deploy_run_id, "manifest.json"),
        repository: production.repository.to_string(),
        deploy_run_id: production.deploy_run_id,
        run_kind: production.run_kind,
        sha: production.sha.to_string(),
        manifest_sha256: production.manifest_sha256,
        updated_at: time(production.updated_ms),
        dbt_cloud_run_id: production.dbt_cloud_run_id,
    }
}
