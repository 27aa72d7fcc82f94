//! Repository routes: the configured repositories and each one's production state (the
//! manifest of its last successful deploy or publish), and publishing a manifest made outside
//! slimci as the new production state.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use slimci_client::{ProductionStateView, RepositoryView};
use slimci_proto::Sha;

use super::views::{production_state_view, production_view};
use super::{ApiError, ApiResult, require_user};
use crate::app::AppState;
use crate::config::RepositoryConfig;
use crate::publish::{Origin, PublishError, publish_manifest};
use crate::rules;

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
    let production = publish_manifest(
        &state,
        repository,
        sha,
        body.into_data_stream(),
        Origin::Api(super::trigger_of(&headers)),
    )
    .await
    .map_err(|error| match error {
        PublishError::TooLarge { .. } => ApiError::TooLarge(error.to_string()),
        PublishError::Refused(message) => ApiError::BadRequest(message),
        PublishError::Internal(message) => ApiError::Internal(message),
        PublishError::Store(error) => error.into(),
    })?;
    Ok((
        StatusCode::CREATED,
        Json(production_view(&state, production)),
    )
        .into_response())
}
