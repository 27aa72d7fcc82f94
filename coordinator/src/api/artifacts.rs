//! Artifact routes: a run's list, downloads (users and agents), and uploads (agents, while the
//! run is running).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use slimci_client::ArtifactView;
use slimci_proto::RunId;

use super::views::artifact_views;
use super::{ApiError, ApiResult, load_run, parse_run_id, require_agent, require_user};
use crate::app::AppState;
use crate::artifacts::ArtifactError;
use crate::rules::RunStatus;
use crate::store::{ArtifactRecord, now_ms};

pub(super) async fn list_artifacts(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<ArtifactView>>> {
    require_user(&state, &headers)?;
    let id = parse_run_id(&id)?;
    load_run(&state, id).await?;
    let artifacts = state.store.artifacts(id).await?;
    Ok(Json(artifact_views(&state, id, artifacts)))
}

pub(super) async fn get_artifact(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    require_user(&state, &headers)?;
    download(&state, parse_run_id(&id)?, &name, Disposition::Inline).await
}

/// How a download is offered: as the answer itself (API clients), or as a file to save (the
/// run page's links).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    Inline,
    Attachment,
}

/// Artifact `name` of run `id`, streamed from the artifact store.
pub(crate) async fn download(
    state: &AppState,
    id: RunId,
    name: &str,
    disposition: Disposition,
) -> ApiResult<Response> {
    let path = state
        .artifacts
        .path(id, name)
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
    let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    if disposition == Disposition::Attachment
        && let Ok(value) =
            header::HeaderValue::from_str(&format!("attachment; filename=\"{name}\""))
    {
        response
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

pub(super) async fn put_artifact(
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
