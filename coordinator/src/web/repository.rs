//! `/repositories/{name}`: a repository's production state (which deploy or published
//! manifest, when), its pull requests with their isolations and last run, its teardowns and
//! its recent deploys.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use slimci_proto::RunKind;

use super::runs::{RunRow, run_row};
use super::{Layout, WebError, WebResult, github_web, render, short_sha, when};
use crate::app::AppState;

/// Pull requests, teardowns and deploys listed.
const LISTED: u32 = 50;

pub struct Production {
    pub run_id: String,
    pub run_kind: &'static str,
    pub sha: String,
    pub manifest_sha256: String,
    pub updated: String,
}

pub struct PullRow {
    pub pr: u64,
    pub pr_url: Option<String>,
    pub isolation: String,
    pub state: String,
    pub ci_runs: u32,
    pub last: RunRow,
    pub teardown: Option<(String, &'static str)>,
}

#[derive(Template)]
#[template(path = "repository.html")]
struct RepositoryPage {
    layout: Layout,
    name: String,
    github_url: Option<String>,
    production_branch: String,
    deploys_on: bool,
    production: Option<Production>,
    pulls: Vec<PullRow>,
    teardowns: Vec<RunRow>,
    deploys: Vec<RunRow>,
}

pub(super) async fn show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> WebResult<Response> {
    let repository = state
        .config
        .repository(&name)
        .ok_or_else(|| WebError::NotFound(format!("no repository `{name}` is configured here")))?
        .clone();
    let github_url = repository
        .github
        .as_deref()
        .and_then(|full_name| github_web(&state, full_name));
    let production = state
        .store
        .production_state(&repository.name)
        .await?
        .map(|production| Production {
            run_id: production.deploy_run_id.to_string(),
            run_kind: production.run_kind.as_str(),
            sha: short_sha(production.sha.as_str()),
            manifest_sha256: production.manifest_sha256,
            updated: when(production.updated_ms),
        });
    let pulls = state
        .store
        .pull_requests_with_runs(&repository.name, LISTED)
        .await?;
    let mut ids: Vec<_> = pulls.iter().map(|pull| pull.last_run.id).collect();
    let teardowns = state
        .store
        .runs_of_kind(&repository.name, RunKind::Teardown, LISTED)
        .await?;
    let mut deploys = state
        .store
        .runs_of_kind(&repository.name, RunKind::Deploy, LISTED)
        .await?;
    deploys.extend(
        state
            .store
            .runs_of_kind(&repository.name, RunKind::Publish, LISTED)
            .await?,
    );
    deploys.sort_by_key(|run| std::cmp::Reverse(run.created_ms));
    deploys.truncate(LISTED as usize);
    ids.extend(deploys.iter().map(|run| run.id));
    let counts = state.store.node_counts(&ids).await?;
    let pulls = pulls
        .into_iter()
        .map(|pull| PullRow {
            pr: pull.pr.0,
            pr_url: github_url
                .as_ref()
                .map(|base| format!("{base}/pull/{}", pull.pr.0)),
            isolation: pull
                .last_run
                .isolation
                .as_ref()
                .map(|name| name.to_string())
                .unwrap_or_default(),
            state: match (&pull.known, &pull.teardown) {
                (Some(known), _) if !known.open => "closed".to_owned(),
                (Some(known), _) if known.draft => "draft".to_owned(),
                (Some(_), _) => "open".to_owned(),
                (None, Some(_)) => "closed".to_owned(),
                (None, None) => String::new(),
            },
            ci_runs: pull.ci_runs,
            last: run_row(&pull.last_run, counts.get(&pull.last_run.id)),
            teardown: pull
                .teardown
                .as_ref()
                .map(|run| (run.id.to_string(), run.status.as_str())),
        })
        .collect();
    let page = RepositoryPage {
        layout: Layout::for_request(&state, &headers, &format!("Repository {name}")),
        name: repository.name.to_string(),
        github_url,
        production_branch: repository.production_branch.clone(),
        deploys_on: repository.deploys,
        production,
        pulls,
        teardowns: teardowns.iter().map(|run| run_row(run, None)).collect(),
        deploys: deploys
            .iter()
            .map(|run| run_row(run, counts.get(&run.id)))
            .collect(),
    };
    Ok(render(&page))
}
