//! The HTTP API, `/api/v1`: JSON in and out, errors as `{"error": "..."}` with a 4xx or 5xx.
//!
//! User routes (runs, logs, artifacts, production state and publishing it, agents, `/metrics`) need the API token when one is
//! configured; agent routes (claim, heartbeat, artifact upload) need the agent token. This file
//! holds the router, the error type, the token checks and the request-parsing helpers; the
//! handlers are in one file per resource, the JSON types in the `slimci-client` crate and their
//! construction in `views`.

mod agent;
pub(crate) mod artifacts;
pub mod fleet;
pub(crate) mod logs;
mod repositories;
mod runs;
pub(crate) mod views;
mod webhook;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use slimci_proto::RunId;

use crate::app::AppState;
use crate::runs::Submitted;
use crate::store::{Run, StoreError};

/// Largest JSON body any route accepts.
const MAX_JSON_BODY: usize = 64 * 1024;

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

pub type ApiResult<T> = Result<T, ApiError>;

/// 201 for a run made for this request; 200 when the same commit was already queued or
/// building and the answer is that run.
pub fn submission_status(submitted: &Submitted) -> StatusCode {
    if submitted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

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

/// Who asked, for a run requested through the API: the `slimci` CLI, or another client named
/// by its `User-Agent`.
fn trigger_of(headers: &HeaderMap) -> slimci_client::Trigger {
    slimci_client::Trigger::from_user_agent(
        headers
            .get(header::USER_AGENT)
            .and_then(|value| value.to_str().ok()),
    )
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
        .route("/metrics", get(fleet::metrics))
        .route("/api/v1/agents", get(fleet::list_agents))
        .route("/api/v1/runs", post(runs::create_run).get(runs::list_runs))
        .route("/api/v1/runs/{id}", get(runs::get_run))
        .route("/api/v1/runs/{id}/logs", get(logs::get_logs))
        .route("/api/v1/runs/{id}/cancel", post(runs::cancel_run))
        .route(
            "/api/v1/runs/{id}/artifacts",
            get(artifacts::list_artifacts),
        )
        .route(
            "/api/v1/runs/{id}/artifacts/{name}",
            get(artifacts::get_artifact)
                .put(artifacts::put_artifact)
                .layer(DefaultBodyLimit::max(artifact_limit)),
        )
        .route("/api/v1/repositories", get(repositories::list_repositories))
        .route(
            "/api/v1/repositories/{name}/production-state",
            get(repositories::get_production_state)
                .post(repositories::publish_production_state)
                .layer(DefaultBodyLimit::max(artifact_limit)),
        )
        .route(
            "/api/v1/repositories/{name}/pulls/{pr}/teardown",
            post(runs::teardown_pull_request),
        )
        .route("/api/v1/agent/claim", post(agent::claim))
        .route("/api/v1/agent/heartbeat", post(agent::heartbeat))
        .route(
            "/webhooks/github",
            // GitHub caps webhook payloads at 25 MB.
            post(webhook::github_webhook).layer(DefaultBodyLimit::max(25 * 1024 * 1024)),
        )
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
