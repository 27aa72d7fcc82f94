//! Repository routes: the configured repositories and each one's production state (the
//! manifest of its last successful deploy or publish), and publishing a manifest made outside
//! slimci as the new production state.

use std::io::BufReader;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use opentelemetry::KeyValue;
use serde::Deserialize;
use slimci_client::{ProductionStateView, RepositoryView};
use slimci_proto::{RunId, Sha};
use slimci_telemetry::semconv;

use super::views::{production_state_view, production_view};
use super::{ApiError, ApiResult, require_user};
use crate::app::AppState;
use crate::artifacts::ArtifactError;
use crate::config::RepositoryConfig;
use crate::rules::{self, ManifestFacts};
use crate::store::{ArtifactRecord, Publish, now_ms};
use crate::telemetry::publish::PublishTrace;

/// The artifact name a production state's manifest has, whichever run made it.
const MANIFEST: &str = "manifest.json";

pub(super) async fn list_repositories(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<RepositoryView>>> {
    require_user(&state, &headers)?;
    let mut repositories = Vec::new();
    for repository in &state.config.repositories {
        repositories.push(RepositoryView {
            name: repository.name.to_string(),
            clone_url: repository.clone_url.clone(),
            production_branch: repository.production_branch.clone(),
            project_dir: repository.project_dir.clone(),
            production_state: production_state_view(&state, &repository.name).await?,
        });
    }
    Ok(Json(repositories))
}

fn configured<'a>(state: &'a AppState, name: &str) -> ApiResult<&'a RepositoryConfig> {
    state
        .config
        .repository(name)
        .ok_or_else(|| ApiError::NotFound(format!("unknown repository `{name}`")))
}

pub(super) async fn get_production_state(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<ProductionStateView>> {
    require_user(&state, &headers)?;
    let repository = configured(&state, &name)?;
    production_state_view(&state, &repository.name)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(rules::no_production_state_message(repository)))
}

#[derive(Deserialize)]
pub(super) struct PublishQuery {
    /// The commit the production run built.
    sha: Option<String>,
}

/// `POST /api/v1/repositories/{name}/production-state?sha=<commit>`: the body is a dbt
/// `manifest.json` made outside slimci. It is stored as the artifact of a new `publish` run,
/// checked to be a manifest, then recorded, finished, as the repository's production state.
pub(super) async fn publish_production_state(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(query): Query<PublishQuery>,
    body: Body,
) -> ApiResult<Response> {
    require_user(&state, &headers)?;
    let repository = configured(&state, &name)?;
    let Some(sha) = query.sha else {
        return Err(ApiError::BadRequest(
            "name the commit the production run built: `?sha=<40 hex digits>`".to_owned(),
        ));
    };
    let sha = Sha::parse(&sha).map_err(|error| ApiError::BadRequest(error.to_string()))?;
    let id = RunId::new();
    let fetch_ref = format!("refs/heads/{}", repository.production_branch);
    let trace = PublishTrace::start(&state, id, &repository.name, &sha, &fetch_ref);
    let step = |name: &str, start: SystemTime, facts: Vec<KeyValue>, error: Option<String>| {
        if let Some(trace) = &trace {
            trace.step(name, start, facts, error);
        }
    };
    let limit = state.config.limits.max_artifact_bytes;
    let recorded = async {
        let receiving = SystemTime::now();
        let stored = state
            .artifacts
            .put(id, MANIFEST, body.into_data_stream(), limit)
            .await
            .map_err(|error| match error {
                ArtifactError::TooLarge { limit } => ApiError::TooLarge(format!(
                    "the manifest is larger than the limit of {limit} bytes (the coordinator's `limits.max_artifact_bytes`)"
                )),
                ArtifactError::Body(_) => ApiError::BadRequest(error.to_string()),
                ArtifactError::BadName(_) | ArtifactError::Io(_) => {
                    ApiError::Internal(error.to_string())
                }
            });
        let facts = match &stored {
            Ok(stored) => vec![
                KeyValue::new(semconv::SLIMCI_MANIFEST_BYTES, stored.size as i64),
                KeyValue::new(semconv::SLIMCI_MANIFEST_SHA256, stored.sha256.clone()),
            ],
            Err(_) => Vec::new(),
        };
        step("receive manifest", receiving, facts, error_of(&stored));
        let stored = stored?;
        let checking = SystemTime::now();
        let facts = check_stored_manifest(&state, id).await;
        let found = match &facts {
            Ok(facts) => vec![KeyValue::new(
                semconv::SLIMCI_MANIFEST_NODES,
                facts.nodes as i64,
            )],
            Err(_) => Vec::new(),
        };
        step("check manifest", checking, found, error_of(&facts));
        let facts = facts?;
        let publish = Publish {
            id,
            repository: repository.name.clone(),
            sha,
            fetch_ref,
            message: rules::published_message(&facts, stored.size),
            manifest: ArtifactRecord {
                name: MANIFEST.to_owned(),
                size: stored.size,
                sha256: stored.sha256,
                created_ms: now_ms(),
            },
            traceparent: trace.as_ref().map(PublishTrace::traceparent),
        };
        let recording = SystemTime::now();
        let production = state.store.record_publish(&publish).await.map_err(ApiError::from);
        step("record production state", recording, Vec::new(), error_of(&production));
        production
    }
    .await;
    if let Some(trace) = trace {
        trace.end(error_of(&recorded));
    }
    let production = match recorded {
        Ok(production) => production,
        Err(error) => {
            if let Err(removing) = state.artifacts.remove_run(id).await {
                tracing::warn!(run = %id, error = %removing, "cannot remove a refused publish's manifest");
            }
            return Err(error);
        }
    };
    tracing::info!(run = %id, repository = %production.repository, sha = %production.sha, manifest_sha256 = %production.manifest_sha256, "manifest published; it is the production state now");
    let _ = state.changes.send(id);
    Ok((
        StatusCode::CREATED,
        Json(production_view(&state, production)),
    )
        .into_response())
}

/// What a step's span says of its failure: the message the publisher gets.
fn error_of<T>(result: &ApiResult<T>) -> Option<String> {
    result.as_ref().err().map(ToString::to_string)
}

/// Reads the stored body back (off the async threads; a manifest can be large) and checks
/// that it is a dbt manifest.
async fn check_stored_manifest(state: &AppState, id: RunId) -> ApiResult<ManifestFacts> {
    let path = state
        .artifacts
        .path(id, MANIFEST)
        .map_err(|error| ApiError::Internal(error.to_string()))?;
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)
            .map_err(|error| ApiError::Internal(format!("{}: {error}", path.display())))?;
        rules::check_manifest(BufReader::new(file))
            .map_err(|error| ApiError::BadRequest(error.to_string()))
    })
    .await
    .map_err(|error| ApiError::Internal(error.to_string()))?
}
