//! Repository routes: the configured repositories and each one's production state (the
//! manifest of its last successful deploy).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use slimci_client::{ProductionStateView, RepositoryView};

use super::views::production_state_view;
use super::{ApiError, ApiResult, require_user};
use crate::app::AppState;

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

pub(super) async fn get_production_state(
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
