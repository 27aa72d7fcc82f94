//! Agent routes: `POST /api/v1/agent/claim` (may this agent build this attempt?) and `POST
//! /api/v1/agent/heartbeat` (renew the leases of the attempts it builds). Bodies are
//! `slimci_proto` messages.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use slimci_proto::{ClaimRequest, ClaimResponse};

use super::{ApiError, ApiResult, require_agent};
use crate::app::AppState;
use crate::rules::ClaimDecision;

fn proto_response<T: serde::Serialize>(message: &T) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        slimci_proto::encode(message),
    )
        .into_response()
}

pub(super) async fn heartbeat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    require_agent(&state, &headers)?;
    let request: slimci_proto::HeartbeatRequest =
        slimci_proto::decode(&body).map_err(|error| ApiError::BadRequest(error.to_string()))?;
    let forgotten = state.agents.heartbeat(
        &request.agent,
        &request.leases,
        request.status.as_ref(),
        chrono::Utc::now(),
    );
    for agent in &forgotten {
        state.metrics.forget_agent(agent);
    }
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
    Ok(proto_response(&slimci_proto::HeartbeatResponse {
        lease_secs: state.config.reliability.lease_secs,
        lost,
    }))
}

pub(super) async fn claim(
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
            state
                .agents
                .claimed(&request.agent, request.run_id, chrono::Utc::now());
            if request.attempt == slimci_proto::Attempt(1)
                && let Some(run) = state.store.run(request.run_id).await?
                && let Some(started) = run.started_ms
            {
                state.metrics.queue_wait.observe(
                    &[run.kind.as_str()],
                    (started - run.queued_ms).max(0) as f64 / 1000.0,
                );
            }
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
    Ok(proto_response(&response))
}
