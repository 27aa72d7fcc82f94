//! The HTTP API, `/api/v1`: JSON in and out, errors as `{"error": "..."}` with a 4xx or 5xx.
//!
//! User routes (runs, logs, artifacts, production state) need the API token when one is
//! configured; agent routes (claim, artifact upload) need the agent token.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};
use slimci_proto::{Attempt, ClaimRequest, ClaimResponse, NodeResult, RunId, RunKind};
use tokio::sync::{Notify, broadcast};
use tokio_stream::wrappers::ReceiverStream;

use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::config::{Config, Secrets};
use crate::logs::LogStore;
use crate::rules::{self, ClaimDecision, RunRequest, RunStatus};
use crate::store::{ArtifactRecord, Run, RunFilter, Store, StoreError, now_ms};

/// Largest JSON body any route accepts.
const MAX_JSON_BODY: usize = 64 * 1024;

pub struct AppState {
    pub config: Arc<Config>,
    pub secrets: Secrets,
    pub store: Store,
    pub logs: Arc<LogStore>,
    pub artifacts: ArtifactStore,
    /// Fires with a run's id whenever anything about it changed (status, log, progress).
    pub changes: broadcast::Sender<RunId>,
    /// Wakes the publisher: a run is waiting in the outbox, or a cancel was requested.
    pub outbox: Arc<Notify>,
    pub public_url: String,
    /// Runs given up as poison; the publisher copies their jobs to the dead-letter queue.
    pub dead_jobs: std::sync::Mutex<Vec<(RunId, String)>>,
    /// Serialises run submissions (supersede and dedupe decisions read then write).
    pub submit_lock: tokio::sync::Mutex<()>,
    /// Fires at shutdown; open log streams end so the server can stop.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// An error as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        tracing::error!(%error, "store error");
        ApiError::Internal(error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|error| ApiError::BadRequest(format!("invalid JSON body: {error}")))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn require_agent(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    match bearer(headers) {
        Some(token) if constant_time_eq(token.as_bytes(), state.secrets.agent_token.as_bytes()) => {
            Ok(())
        }
        _ => Err(ApiError::Unauthorized),
    }
}

/// Users present the API token; agents may read with theirs (they download manifests).
fn require_user(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(api_token) = &state.secrets.api_token else {
        return Ok(());
    };
    match bearer(headers) {
        Some(token)
            if constant_time_eq(token.as_bytes(), api_token.as_bytes())
                || constant_time_eq(token.as_bytes(), state.secrets.agent_token.as_bytes()) =>
        {
            Ok(())
        }
        _ => Err(ApiError::Unauthorized),
    }
}

fn parse_run_id(text: &str) -> ApiResult<RunId> {
    RunId::parse(text).map_err(|error| ApiError::BadRequest(error.to_string()))
}

async fn load_run(state: &AppState, id: RunId) -> ApiResult<Run> {
    state
        .store
        .run(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no run {id}")))
}

pub fn router(state: Arc<AppState>) -> Router {
    let artifact_limit =
        usize::try_from(state.config.limits.max_artifact_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/v1/runs", post(create_run).get(list_runs))
        .route("/api/v1/runs/{id}", get(get_run))
        .route("/api/v1/runs/{id}/logs", get(get_logs))
        .route("/api/v1/runs/{id}/cancel", post(cancel_run))
        .route("/api/v1/runs/{id}/artifacts", get(list_artifacts))
        .route(
            "/api/v1/runs/{id}/artifacts/{name}",
            get(get_artifact)
                .put(put_artifact)
                .layer(DefaultBodyLimit::max(artifact_limit)),
        )
        .route("/api/v1/repositories", get(list_repositories))
        .route(
            "/api/v1/repositories/{name}/production-state",
            get(get_production_state),
        )
        .route(
            "/api/v1/repositories/{name}/pulls/{pr}/teardown",
            post(teardown_pull_request),
        )
        .route("/api/v1/agent/claim", post(claim))
        .route("/api/v1/agent/heartbeat", post(heartbeat))
        .route(
            "/webhooks/github",
            // GitHub caps webhook payloads at 25 MB.
            post(crate::webhook::github_webhook).layer(DefaultBodyLimit::max(25 * 1024 * 1024)),
        )
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .with_state(state)
}

// ---- views ----

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn seconds(from: i64, to: i64) -> f64 {
    (to - from).max(0) as f64 / 1000.0
}

#[derive(Serialize)]
struct StateView {
    deploy_run_id: RunId,
    sha: String,
    manifest_sha256: String,
}

#[derive(Serialize)]
struct PhaseView {
    attempt: Attempt,
    phase: String,
    started_at: String,
    finished_at: Option<String>,
    duration_s: Option<f64>,
    ok: Option<bool>,
}

/// Node counts for people: what the summary line and the PR comment say.
#[derive(Serialize, Default, Debug, PartialEq, Eq)]
pub struct Summary {
    pub selected: u32,
    pub built: u32,
    pub tests_passed: u32,
    pub tests_failed: u32,
    pub warned: u32,
    pub errored: u32,
    pub skipped: u32,
}

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

#[derive(Serialize)]
struct ArtifactView {
    name: String,
    size: u64,
    sha256: String,
    url: String,
}

#[derive(Serialize)]
struct RunView {
    id: RunId,
    repository: String,
    kind: RunKind,
    pr: Option<u64>,
    sha: Option<String>,
    git_ref: String,
    isolation: Option<String>,
    status: RunStatus,
    message: Option<String>,
    attempt: Attempt,
    agent: Option<String>,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    duration_s: Option<f64>,
    timeout_secs: u64,
    cancel_requested: bool,
    /// Position among runs waiting to start (1 = next), while queued.
    queue_position: Option<u32>,
    superseded_by: Option<RunId>,
    /// Parents read from production instead of being built.
    deferred: Vec<String>,
    production_state: Option<StateView>,
    progress: serde_json::Value,
    dbt_exit_code: Option<i32>,
    /// The protections the build ran under (the agent's report), once it started.
    sandbox: Option<serde_json::Value>,
    /// The agent caches the build used, and whether dbt's parse was partial or full.
    caches: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<Summary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phases: Option<Vec<PhaseView>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nodes: Option<Vec<NodeResult>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    artifacts: Option<Vec<ArtifactView>>,
    url: String,
}

impl AppState {
    fn artifact_url(&self, run: RunId, name: &str) -> String {
        format!("{}/api/v1/runs/{run}/artifacts/{name}", self.public_url)
    }

    fn run_view(&self, run: Run) -> RunView {
        let production_state = run.compared_against.as_ref().map(|stamp| StateView {
            deploy_run_id: stamp.deploy_run_id,
            sha: stamp.sha.to_string(),
            manifest_sha256: stamp.manifest_sha256.clone(),
        });
        RunView {
            url: format!("{}/api/v1/runs/{}", self.public_url, run.id),
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
            progress: serde_json::json!({ "done": run.progress_done, "total": run.progress_total }),
            dbt_exit_code: run.dbt_exit_code,
            sandbox: run
                .sandbox
                .as_deref()
                .and_then(|json| serde_json::from_str(json).ok()),
            caches: run
                .caches
                .as_deref()
                .and_then(|json| serde_json::from_str(json).ok()),
            summary: None,
            phases: None,
            nodes: None,
            artifacts: None,
        }
    }

    async fn full_run_view(&self, run: Run) -> ApiResult<RunView> {
        let id = run.id;
        let mut phases = self.store.phases(id).await?;
        phases.sort_by_key(|phase| (phase.attempt, crate::store::phase_order(&phase.phase)));
        let nodes = self.store.nodes(id).await?;
        let artifacts = self.store.artifacts(id).await?;
        let queue_position = self.store.queue_position(&run).await?;
        let mut view = self.run_view(run);
        view.queue_position = queue_position;
        view.summary = Some(summarize(&nodes));
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
        view.artifacts = Some(
            artifacts
                .into_iter()
                .map(|artifact| ArtifactView {
                    url: self.artifact_url(id, &artifact.name),
                    name: artifact.name,
                    size: artifact.size,
                    sha256: artifact.sha256,
                })
                .collect(),
        );
        Ok(view)
    }
}

// ---- runs ----

async fn create_run(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    require_user(&state, &headers)?;
    let request: RunRequest = parse_json(&body)?;
    let valid = rules::validate_request(&state.config, &request)
        .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    let submitted = crate::runs::submit(&state, valid).await?;
    // 201 for a new run; 200 when the same commit was already queued or building.
    let status = if submitted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(state.full_run_view(submitted.run).await?)).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    repository: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
}

async fn list_runs(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<Vec<RunView>>> {
    require_user(&state, &headers)?;
    let status = match query.status.as_deref() {
        None => None,
        Some(text) => Some(
            RunStatus::parse(text)
                .ok_or_else(|| ApiError::BadRequest(format!("unknown status `{text}`")))?,
        ),
    };
    let filter = RunFilter {
        repository: query.repository,
        status,
        limit: query.limit.unwrap_or(50),
    };
    let runs = state.store.runs(&filter).await?;
    Ok(Json(
        runs.into_iter().map(|run| state.run_view(run)).collect(),
    ))
}

async fn get_run(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<RunView>> {
    require_user(&state, &headers)?;
    let run = load_run(&state, parse_run_id(&id)?).await?;
    Ok(Json(state.full_run_view(run).await?))
}

async fn cancel_run(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    require_user(&state, &headers)?;
    let id = parse_run_id(&id)?;
    let run = crate::runs::cancel(&state, id, crate::rules::CANCELLED_BY_USER)
        .await
        .map_err(|error| match error {
            crate::runs::CancelError::Unknown(_) => ApiError::NotFound(error.to_string()),
            crate::runs::CancelError::AlreadyFinished { .. } => {
                ApiError::Conflict(error.to_string())
            }
            crate::runs::CancelError::Store(error) => error.into(),
        })?;
    Ok((StatusCode::ACCEPTED, Json(state.full_run_view(run).await?)).into_response())
}

/// `POST /api/v1/repositories/{name}/pulls/{pr}/teardown`: stop the PR's builds and drop its
/// isolation, for CI systems other than GitHub (a closed merge request).
async fn teardown_pull_request(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((name, pr)): Path<(String, u64)>,
) -> ApiResult<Response> {
    require_user(&state, &headers)?;
    let repository = state
        .config
        .repository(&name)
        .ok_or_else(|| ApiError::NotFound(format!("unknown repository `{name}`")))?
        .clone();
    if pr == 0 {
        return Err(ApiError::BadRequest(
            "pull request numbers start at 1".to_owned(),
        ));
    }
    let pr = slimci_proto::PrNumber(pr);
    crate::runs::cancel_pull_request(&state, &repository, pr, "the pull request was closed")
        .await?;
    let submitted = crate::runs::teardown(&state, &repository, pr).await?;
    let status = if submitted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(state.full_run_view(submitted.run).await?)).into_response())
}

// ---- logs ----

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
}

async fn get_logs(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> ApiResult<Response> {
    require_user(&state, &headers)?;
    let id = parse_run_id(&id)?;
    let run = load_run(&state, id).await?;
    if query.follow {
        // A client resuming after a dropped connection says which line it saw last.
        let resume_after = headers
            .get("last-event-id")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0);
        return Ok(follow_logs(state, run, resume_after).into_response());
    }
    let mut text = String::new();
    for attempt in 1..=run.attempt.0 {
        if run.attempt.0 > 1 {
            text.push_str(&format!("[slimci] attempt {attempt}\n"));
        }
        let mut offset = 0;
        loop {
            let (lines, next) = state
                .logs
                .read_from(id, Attempt(attempt), offset)
                .map_err(|error| ApiError::Internal(error.to_string()))?;
            if lines.is_empty() {
                break;
            }
            for line in lines {
                text.push_str(&line);
                text.push('\n');
            }
            offset = next;
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// Server-sent events: `log` (one line each, `id` = line number), `progress` (`{done,total}`),
/// and a final `end` carrying the run's terminal status, after which the stream closes.
fn follow_logs(state: Arc<AppState>, run: Run, resume_after: u64) -> impl IntoResponse {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(256);
    let mut changes = state.changes.subscribe();
    tokio::spawn(async move {
        let id = run.id;
        let mut attempt = Attempt(1);
        let mut offset = 0u64;
        let mut line_number = 0u64;
        let mut progress = (u32::MAX, u32::MAX);
        loop {
            let Ok(Some(run)) = state.store.run(id).await else {
                return;
            };
            // Drain every attempt up to the current one; lines of finished attempts are final.
            loop {
                let Ok((lines, next)) = state.logs.read_from(id, attempt, offset) else {
                    return;
                };
                for line in lines {
                    line_number += 1;
                    if line_number <= resume_after {
                        continue;
                    }
                    let event = Event::default()
                        .event("log")
                        .id(line_number.to_string())
                        .data(line);
                    if sender.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                offset = next;
                if attempt < run.attempt {
                    attempt = Attempt(attempt.0 + 1);
                    offset = 0;
                    continue;
                }
                break;
            }
            if (run.progress_done, run.progress_total) != progress {
                progress = (run.progress_done, run.progress_total);
                let data =
                    serde_json::json!({ "done": progress.0, "total": progress.1 }).to_string();
                if sender
                    .send(Ok(Event::default().event("progress").data(data)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if run.status.is_terminal() {
                // The terminal status is written after the last log batch was applied.
                let (lines, _) = state
                    .logs
                    .read_from(id, attempt, offset)
                    .unwrap_or_default();
                if lines.is_empty() {
                    let data = serde_json::json!({ "status": run.status, "message": run.message })
                        .to_string();
                    let _ = sender
                        .send(Ok(Event::default().event("end").data(data)))
                        .await;
                    return;
                }
                continue;
            }
            // Wait for a change to this run; the timeout covers missed notifications.
            let deadline = tokio::time::sleep(Duration::from_secs(2));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    () = sender.closed() => return,
                    () = state.shutdown.cancelled() => return,
                    change = changes.recv() => match change {
                        Ok(changed) if changed != id => continue,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        }
    });
    Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

// ---- artifacts ----

async fn list_artifacts(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<ArtifactView>>> {
    require_user(&state, &headers)?;
    let id = parse_run_id(&id)?;
    load_run(&state, id).await?;
    let artifacts = state.store.artifacts(id).await?;
    Ok(Json(
        artifacts
            .into_iter()
            .map(|artifact| ArtifactView {
                url: state.artifact_url(id, &artifact.name),
                name: artifact.name,
                size: artifact.size,
                sha256: artifact.sha256,
            })
            .collect(),
    ))
}

async fn get_artifact(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    require_user(&state, &headers)?;
    let id = parse_run_id(&id)?;
    let path = state
        .artifacts
        .path(id, &name)
        .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::NotFound(format!(
                "run {id} has no artifact `{name}`"
            )));
        }
        Err(error) => return Err(ApiError::Internal(error.to_string())),
    };
    let content_type = if name.ends_with(".json") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

async fn put_artifact(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult<StatusCode> {
    require_agent(&state, &headers)?;
    let id = parse_run_id(&id)?;
    let run = load_run(&state, id).await?;
    if run.status != RunStatus::Running {
        return Err(ApiError::Conflict(format!(
            "run {id} is {}; artifacts are accepted only while it runs",
            run.status.as_str()
        )));
    }
    let limit = state.config.limits.max_artifact_bytes;
    let stored = state
        .artifacts
        .put(id, &name, body.into_data_stream(), limit)
        .await
        .map_err(|error| match error {
            ArtifactError::BadName(_) => ApiError::BadRequest(error.to_string()),
            ArtifactError::TooLarge { .. } => ApiError::TooLarge(error.to_string()),
            ArtifactError::Body(_) => ApiError::BadRequest(error.to_string()),
            ArtifactError::Io(_) => ApiError::Internal(error.to_string()),
        })?;
    let record = ArtifactRecord {
        name,
        size: stored.size,
        sha256: stored.sha256,
        created_ms: now_ms(),
    };
    state.store.record_artifact(id, &record).await?;
    Ok(StatusCode::CREATED)
}

// ---- repositories ----

#[derive(Serialize)]
struct ProductionStateView {
    repository: String,
    deploy_run_id: RunId,
    sha: String,
    manifest_sha256: String,
    manifest_url: String,
    updated_at: String,
}

async fn production_state_view(
    state: &AppState,
    name: &slimci_proto::RepoName,
) -> ApiResult<Option<ProductionStateView>> {
    Ok(state
        .store
        .production_state(name)
        .await?
        .map(|production| ProductionStateView {
            repository: name.to_string(),
            manifest_url: state.artifact_url(production.deploy_run_id, "manifest.json"),
            deploy_run_id: production.deploy_run_id,
            sha: production.sha.to_string(),
            manifest_sha256: production.manifest_sha256,
            updated_at: time(production.updated_ms),
        }))
}

async fn list_repositories(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    require_user(&state, &headers)?;
    let mut repositories = Vec::new();
    for repository in &state.config.repositories {
        repositories.push(serde_json::json!({
            "name": repository.name,
            "clone_url": repository.clone_url,
            "production_branch": repository.production_branch,
            "project_dir": repository.project_dir,
            "production_state": production_state_view(&state, &repository.name).await?,
        }));
    }
    Ok(Json(serde_json::Value::Array(repositories)))
}

async fn get_production_state(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<ProductionStateView>> {
    require_user(&state, &headers)?;
    let repository = state
        .config
        .repository(&name)
        .ok_or_else(|| ApiError::NotFound(format!("unknown repository `{name}`")))?;
    production_state_view(&state, &repository.name)
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::NotFound(crate::rules::no_production_state_message(&repository.name))
        })
}

// ---- agents ----

async fn heartbeat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    require_agent(&state, &headers)?;
    let request: slimci_proto::HeartbeatRequest =
        slimci_proto::decode(&body).map_err(|error| ApiError::BadRequest(error.to_string()))?;
    let lost = state
        .store
        .renew_leases(
            request.agent.as_str(),
            &request.leases,
            crate::leases::lease_duration(&state),
        )
        .await?;
    for lease in &lost {
        tracing::warn!(run = %lease.run_id, attempt = %lease.attempt, agent = %request.agent, "heartbeat for an attempt the agent no longer holds; telling it to stop");
    }
    let response = slimci_proto::HeartbeatResponse {
        lease_secs: state.config.reliability.lease_secs,
        lost,
    };
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        slimci_proto::encode(&response),
    )
        .into_response())
}

async fn claim(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    require_agent(&state, &headers)?;
    let request: ClaimRequest =
        slimci_proto::decode(&body).map_err(|error| ApiError::BadRequest(error.to_string()))?;
    let decision = state
        .store
        .claim(&request, crate::leases::lease_duration(&state))
        .await?;
    let _ = state.changes.send(request.run_id);
    let response = match decision {
        ClaimDecision::Grant => {
            tracing::info!(run = %request.run_id, attempt = %request.attempt, agent = %request.agent, "claim granted");
            ClaimResponse {
                granted: true,
                reason: None,
                lease_secs: state.config.reliability.lease_secs,
            }
        }
        ClaimDecision::Refuse(reason) => {
            tracing::info!(run = %request.run_id, attempt = %request.attempt, agent = %request.agent, %reason, "claim refused");
            ClaimResponse {
                granted: false,
                reason: Some(reason),
                lease_secs: 0,
            }
        }
    };
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        slimci_proto::encode(&response),
    )
        .into_response())
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
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
