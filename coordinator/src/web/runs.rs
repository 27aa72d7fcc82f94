//! `/`: recent runs, filtered by repository, pull request and status; and `RunRow`, a run as
//! one row of a list (also the fleet page's).

use std::sync::Arc;

use askama::Template;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use slimci_client::{Summary, summarize};
use slimci_proto::{NodeResult, PrNumber, RepoName, RunId};

use super::{Layout, WebError, WebResult, duration, render, short_sha, when};
use crate::app::AppState;
use crate::rules::RunStatus;
use crate::store::{NodeCount, PageFilter, Run, now_ms};

/// A run as a row of the run list.
pub struct RunRow {
    pub id: String,
    pub short_id: String,
    pub repository: String,
    pub kind: &'static str,
    pub pr: Option<u64>,
    pub sha: String,
    pub status: &'static str,
    pub created: String,
    pub duration: String,
    pub built: u32,
    pub failed: u32,
    pub deferred: usize,
    pub agent: String,
}

/// How long the run has built (so far).
pub(super) fn seconds(run: &Run) -> Option<f64> {
    run.started_ms
        .map(|start| (run.finished_ms.unwrap_or_else(now_ms) - start).max(0) as f64 / 1000.0)
}

/// The summary counts from grouped node counts, by `summarize`'s one classification.
pub(super) fn summary_of(counts: &[NodeCount]) -> Summary {
    let mut total = Summary::default();
    for count in counts {
        let one = summarize(&[NodeResult {
            unique_id: String::new(),
            resource_type: count.resource_type.clone(),
            status: count.status.clone(),
            execution_time_s: 0.0,
            message: None,
            failures: None,
            relation: None,
            adapter_response: None,
            started_at: None,
            completed_at: None,
        }]);
        total.selected += count.count;
        total.built += one.built * count.count;
        total.tests_passed += one.tests_passed * count.count;
        total.tests_failed += one.tests_failed * count.count;
        total.warned += one.warned * count.count;
        total.errored += one.errored * count.count;
        total.skipped += one.skipped * count.count;
    }
    total
}

pub fn run_row(run: &Run, counts: Option<&Vec<NodeCount>>) -> RunRow {
    let summary = counts.map(|counts| summary_of(counts)).unwrap_or_default();
    let id = run.id.to_string();
    RunRow {
        short_id: id
            .chars()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect(),
        id,
        repository: run.repository.to_string(),
        kind: run.kind.as_str(),
        pr: run.pr.map(|pr| pr.0),
        sha: run
            .sha
            .as_ref()
            .map(|sha| short_sha(sha.as_str()))
            .unwrap_or_default(),
        status: run.status.as_str(),
        created: when(run.created_ms),
        duration: seconds(run).map(duration).unwrap_or_default(),
        built: summary.built,
        failed: summary.tests_failed + summary.errored,
        deferred: run.deferred.len(),
        agent: run.agent.clone().unwrap_or_default(),
    }
}

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage {
    layout: Layout,
    repositories: Vec<Choice>,
    statuses: Vec<Choice>,
    pr: String,
    runs: Vec<RunRow>,
}

/// An option of a filter's select.
pub struct Choice {
    pub value: String,
    pub selected: bool,
}

pub(super) fn choices<'a>(
    values: impl Iterator<Item = &'a str>,
    chosen: Option<&str>,
) -> Vec<Choice> {
    values
        .map(|value| Choice {
            selected: chosen == Some(value),
            value: value.to_owned(),
        })
        .collect()
}

#[derive(Deserialize)]
pub(super) struct IndexQuery {
    repository: Option<String>,
    pr: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
}

pub(super) async fn index(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<IndexQuery>,
) -> WebResult<Response> {
    let nonempty = |value: &Option<String>| {
        value
            .as_deref()
            .map(str::trim)
            .filter(|value| !value.is_empty())
            .map(str::to_owned)
    };
    let repository = nonempty(&query.repository);
    let pr = nonempty(&query.pr);
    let status = nonempty(&query.status);
    let filter = PageFilter {
        repository: repository
            .as_deref()
            .map(|name| {
                RepoName::parse(name)
                    .map_err(|error| WebError::BadRequest(format!("repository: {error}")))
            })
            .transpose()?,
        pr: pr
            .as_deref()
            .map(|text| {
                text.trim_start_matches('#')
                    .parse::<u64>()
                    .ok()
                    .filter(|pr| *pr > 0)
                    .map(PrNumber)
                    .ok_or_else(|| {
                        WebError::BadRequest(format!(
                            "pull request `{text}` is not a number like 7"
                        ))
                    })
            })
            .transpose()?,
        status: status
            .as_deref()
            .map(|text| {
                RunStatus::parse(text)
                    .ok_or_else(|| WebError::BadRequest(format!("unknown status `{text}`")))
            })
            .transpose()?,
        limit: query.limit.unwrap_or(50).clamp(1, 500),
    };
    let runs = state.store.page_runs(&filter).await?;
    let ids: Vec<RunId> = runs.iter().map(|run| run.id).collect();
    let counts = state.store.node_counts(&ids).await?;
    let page = IndexPage {
        layout: Layout::for_request(&state, &headers, "Runs"),
        repositories: choices(
            state
                .config
                .repositories
                .iter()
                .map(|repository| repository.name.as_str()),
            repository.as_deref(),
        ),
        statuses: choices(
            RunStatus::ALL.iter().map(|status| status.as_str()),
            status.as_deref(),
        ),
        pr: pr.unwrap_or_default(),
        runs: runs
            .iter()
            .map(|run| run_row(run, counts.get(&run.id)))
            .collect(),
    };
    Ok(render(&page))
}
