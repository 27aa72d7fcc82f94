//! The fleet and the numbers: `GET /api/v1/agents` (every agent as it last said of itself,
//! from `crate::agents`) and `GET /metrics` (Prometheus text, `crate::metrics`). Both need the
//! user API's token; `/metrics` can also be served without one on a listen address of its own
//! (`[telemetry] metrics_listen`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use chrono::{SecondsFormat, Utc};
use slimci_client::AgentView;

use super::{ApiResult, require_user};
use crate::app::AppState;

/// Prometheus' text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(super) async fn list_agents(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<AgentView>>> {
    require_user(&state, &headers)?;
    Ok(Json(agent_views(&state)))
}

/// Every agent the coordinator knows, by name.
pub fn agent_views(state: &AppState) -> Vec<AgentView> {
    state
        .agents
        .list(Utc::now())
        .into_iter()
        .map(|(record, agent_state)| AgentView {
            name: record.name.to_string(),
            state: agent_state.as_str().to_owned(),
            version: record.status.as_ref().map(|status| status.version.clone()),
            slots: record.status.as_ref().map(|status| status.slots),
            busy_slots: record.busy_slots(),
            current_runs: record.current_runs.clone(),
            last_heartbeat: record
                .last_heartbeat
                .to_rfc3339_opts(SecondsFormat::Millis, true),
            draining: record.status.as_ref().is_some_and(|status| status.draining),
        })
        .collect()
}

pub(super) async fn metrics(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    require_user(&state, &headers)?;
    open_metrics(State(state)).await
}

/// `/metrics` without a token, for the separate metrics listener.
pub async fn open_metrics(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let text = crate::metrics::render(&state).await?;
    Ok(([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response())
}
