//! Run routes: `POST /api/v1/runs` (create), `GET /api/v1/runs` (list), `GET
//! /api/v1/runs/{id}`, `POST /api/v1/runs/{id}/cancel`, and a pull request's teardown.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use slimci_client::RunView;

use super::views::{full_run_view, run_view};
use super::{
    ApiError, ApiResult, load_run, parse_json, parse_run_id, require_user, submission_status,
};
use crate::app::AppState;
use crate::rules::{self, RunStatus};
use crate::runs::CancelError;
use crate::store::RunFilter;

pub(super) async fn create_run(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    require_user(&state, &headers)?;
    let request: slimci_client::RunRequest = parse_json(&body)?;
    let valid = rules::validate_request(&state.config, &request).map_err(|error| {
        if error.is_conflict() {
            ApiError::Conflict(error.to_string())
        } else {
            ApiError::BadRequest(error.to_string())
        }
    })?;
    let submitted = crate::runs::submit(&state, valid, super::trigger_of(&headers)).await?;
    let status = submission_status(&submitted);
    Ok((status, Json(full_run_view(&state, submitted.run).await?)).into_response())
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    repository: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
}

pub(super) async fn list_runs(
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
        runs.into_iter().map(|run| run_view(&state, run)).collect(),
    ))
}

pub(super) async fn get_run(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<RunView>> {
    require_user(&state, &headers)?;
    let run = load_run(&state, parse_run_id(&id)?).await?;
    Ok(Json(full_run_view(&state, run).await?))
}

pub(super) async fn cancel_run(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    require_user(&state, &headers)?;
    let id = parse_run_id(&id)?;
    let run = crate::runs::cancel(&state, id, crate::rules::CANCELLED_BY_USER)
        .await
        .map_err(|error| match error {
            CancelError::Unknown(_) => ApiError::NotFound(error.to_string()),
            CancelError::AlreadyFinished { .. } => ApiError::Conflict(error.to_string()),
            CancelError::Store(error) => error.into(),
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(full_run_view(&state, run).await?),
    )
        .into_response())
}

/// `POST /api/v1/repositories/{name}/pulls/{pr}/teardown`: stop the PR's builds and drop its
/// isolation, for CI systems other than GitHub (a closed merge request).
pub(super) async fn teardown_pull_request(
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
    let submitted = crate::runs::teardown(
        &state,
        &repository,
        pr,
        super::trigger_of(&headers),
        &crate::telemetry::Origin::Request,
    )
    .await?;
    let status = submission_status(&submitted);
    Ok((status, Json(full_run_view(&state, submitted.run).await?)).into_response())
}
