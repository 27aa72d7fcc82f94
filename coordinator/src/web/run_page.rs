//! `/runs/{id}`: one run, with its head (`run_head`), log (following live while it runs),
//! phases, nodes (failures first, filtered), the build's timeline, artifacts and a cancel
//! button; and `/runs/{id}/cancel`, that button's CSRF-checked form.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Form, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use slimci_client::Summary;
use slimci_proto::RunId;

use super::run_head::{Head, head};
use super::run_links::{load_run, parse_id, size, timeline_of};
use super::runs::{Choice, choices, summary_of};
use super::timeline::status_class;
use super::{CsrfForm, Layout, WebError, WebResult, auth, duration, render, short_sha, when};
use crate::app::AppState;
use crate::rules::CANCELLED_BY_USER;
use crate::runs::CancelError;
use crate::store::{NodeFilter, Run};

/// Log lines a run's page shows; the whole log is a link away.
const LOG_TAIL: usize = 300;
/// A log line longer than this is cut on the page (not in the log).
const LOG_LINE_CHARS: usize = 2000;
/// Node rows shown unless the reader asks for all.
const NODE_ROWS: u32 = 100;
/// Node rows per table of the node list: each table is laid out and painted only when it is
/// scrolled near (`content-visibility: auto` on `.rows`), so a page of a hundred rows (or of
/// all of them) costs its first paint at most one table's.
const NODE_CHUNK_ROWS: usize = 20;
/// Deferred parents listed by name.
const DEFERRED_LISTED: usize = 200;

pub struct PhaseRow {
    pub attempt: u32,
    pub phase: String,
    pub started: String,
    pub duration: String,
    pub outcome: &'static str,
}

pub struct NodeRow {
    pub unique_id: String,
    pub status: String,
    pub class: &'static str,
    pub time: String,
    pub rows: String,
    pub message: String,
}

pub struct ArtifactRow {
    pub name: String,
    pub size: String,
    pub sha256: String,
}

/// A run's page, ready to render.
#[derive(Template)]
#[template(path = "run.html")]
pub struct RunPage {
    layout: Layout,
    head: Head,
    summary: Summary,
    deferred_count: usize,
    deferred: Vec<String>,
    phases: Vec<PhaseRow>,
    node_total: usize,
    nodes: Vec<NodeRow>,
    /// `NODE_CHUNK_ROWS`, for the template.
    node_chunk_rows: usize,
    nodes_matching: usize,
    filter_q: String,
    filter_status: String,
    node_statuses: Vec<Choice>,
    timeline: Option<Arc<str>>,
    timeline_note: String,
    log_lines: Vec<String>,
    log_total: u64,
    log_cut: bool,
    artifacts: Vec<ArtifactRow>,
    cancel_csrf: Option<String>,
}

#[derive(Deserialize, Default)]
pub struct NodeQuery {
    q: Option<String>,
    status: Option<String>,
    all: Option<String>,
}

fn first_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() > max {
        let cut: String = line.chars().take(max).collect();
        format!("{cut}…")
    } else {
        line.to_owned()
    }
}

/// The last `LOG_TAIL` lines of the run's log, and how many there are (the event stream
/// numbers lines the same way, so the page's live log goes on from there).
fn log_tail(state: &AppState, run: &Run) -> WebResult<(Vec<String>, u64)> {
    let (tail, total) = state
        .logs
        .tail(run.id, run.attempt, LOG_TAIL)
        .map_err(|error| WebError::Internal(error.to_string()))?;
    Ok((
        tail.iter()
            .map(|line| first_line(line, LOG_LINE_CHARS))
            .collect(),
        total,
    ))
}

/// Builds run `id`'s page for this request.
pub async fn run_page(
    state: &AppState,
    headers: &HeaderMap,
    id: RunId,
    query: &NodeQuery,
) -> WebResult<RunPage> {
    let run = load_run(state, id).await?;
    let mut phases = state.store.phases(id).await?;
    phases.sort_by_key(|phase| (phase.attempt, crate::store::phase_order(&phase.phase)));
    let counts = state
        .store
        .node_counts(&[id])
        .await?
        .remove(&id)
        .unwrap_or_default();
    let artifacts = state.store.artifacts(id).await?;
    let queue_position = state.store.queue_position(&run).await?;
    let summary = summary_of(&counts);
    let node_total = summary.selected as usize;
    let compared_cloud_run = match &run.compared_against {
        Some(stamp) => state
            .store
            .run(stamp.deploy_run_id)
            .await?
            .and_then(|production| production.dbt_cloud_run_id),
        None => None,
    };
    let head = head(state, &run, queue_position, compared_cloud_run);

    // Failures first, then the slowest; sorted, filtered and cut by the store.
    let filter_q = query.q.clone().unwrap_or_default().trim().to_owned();
    let filter_status = query.status.clone().unwrap_or_default();
    let show_all = query.all.is_some();
    let listed = state
        .store
        .page_nodes(
            id,
            &NodeFilter {
                name_part: filter_q.clone(),
                status: filter_status.clone(),
                limit: (!show_all).then_some(NODE_ROWS),
            },
        )
        .await?;
    let mut statuses: Vec<&str> = counts.iter().map(|count| count.status.as_str()).collect();
    statuses.sort_unstable();
    statuses.dedup();
    let node_statuses = choices(
        std::iter::once("failures").chain(statuses),
        Some(filter_status.as_str()),
    );
    let node_rows = listed
        .nodes
        .iter()
        .map(|node| NodeRow {
            unique_id: node.unique_id.clone(),
            status: node.status.clone(),
            class: status_class(&node.status),
            time: format!("{:.2} s", node.execution_time_s),
            rows: node
                .adapter_response
                .as_ref()
                .and_then(|response| response.get("rows_affected"))
                .and_then(serde_json::Value::as_i64)
                .map(|rows| rows.to_string())
                .unwrap_or_default(),
            message: node
                .message
                .as_deref()
                .map(|message| first_line(message, 500))
                .unwrap_or_default(),
        })
        .collect();

    let timeline = timeline_of(state, id, &artifacts).await;
    let (log_lines, log_total) = log_tail(state, &run)?;
    let cancellable = !run.status.is_terminal() && !run.cancel_requested;
    Ok(RunPage {
        layout: Layout::for_request(state, headers, &format!("Run {}", short_sha(&head.id))),
        summary,
        deferred_count: run.deferred.len(),
        deferred: run.deferred.iter().take(DEFERRED_LISTED).cloned().collect(),
        phases: phases
            .iter()
            .map(|phase| PhaseRow {
                attempt: phase.attempt.0,
                phase: phase.phase.clone(),
                started: when(phase.started_ms),
                duration: phase
                    .finished_ms
                    .map(|end| duration((end - phase.started_ms).max(0) as f64 / 1000.0))
                    .unwrap_or_else(|| "running".to_owned()),
                outcome: match phase.ok {
                    Some(true) => "ok",
                    Some(false) => "failed",
                    None => "",
                },
            })
            .collect(),
        node_total,
        nodes_matching: usize::try_from(listed.matching).unwrap_or(usize::MAX),
        nodes: node_rows,
        node_chunk_rows: NODE_CHUNK_ROWS,
        filter_q,
        filter_status,
        node_statuses,
        timeline: timeline.svg,
        timeline_note: timeline.note,
        log_cut: log_total > log_lines.len() as u64,
        log_lines,
        log_total,
        artifacts: artifacts
            .iter()
            .map(|artifact| ArtifactRow {
                name: artifact.name.clone(),
                size: size(artifact.size),
                sha256: artifact.sha256.clone(),
            })
            .collect(),
        cancel_csrf: cancellable.then(|| auth::csrf_token(state, headers)),
        head,
    })
}

pub(super) async fn show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<NodeQuery>,
) -> WebResult<Response> {
    let page = run_page(&state, &headers, parse_id(&id)?, &query).await?;
    Ok(render(&page))
}

/// `POST /runs/{id}/cancel`: the page's cancel button. Refused with 403, changing nothing,
/// unless the form carries this session's CSRF token.
pub(super) async fn cancel(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> WebResult<Response> {
    let id = parse_id(&id)?;
    if !auth::csrf_valid(&state, &headers, form.csrf.as_deref()) {
        tracing::warn!(run = %id, "web cancel refused: missing or wrong CSRF token");
        return Err(WebError::Forbidden(
            "this cancel did not come from the run's page (its form token is missing or out of date); reload the page and press cancel again".to_owned(),
        ));
    }
    match crate::runs::cancel(&state, id, CANCELLED_BY_USER).await {
        Ok(_) | Err(CancelError::AlreadyFinished { .. }) => {
            Ok(Redirect::to(&format!("/runs/{id}")).into_response())
        }
        Err(CancelError::Unknown(_)) => Err(WebError::NotFound(format!("no run {id}"))),
        Err(CancelError::Store(error)) => Err(error.into()),
    }
}
