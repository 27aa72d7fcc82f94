//! `/`: recent runs, filtered by repository, pull request and status. `/runs/{id}`: one run,
//! with its log (following live while it runs), phases, nodes, the build's timeline,
//! artifacts and a cancel button; `/runs/{id}/cancel`, `/events`, `/log` and
//! `/artifacts/{name}` serve that page.

use std::collections::VecDeque;
use std::sync::Arc;

use askama::Template;
use axum::body::Body;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use slimci_client::{Summary, Waiting, is_failure, summarize};
use slimci_proto::{Attempt, NodeResult, PrNumber, RepoName, RunId, RunKind, Topology};

use super::timeline::{Timeline, status_class};
use super::{
    CsrfForm, Layout, WebError, WebResult, auth, duration, github_web, render, short_sha, when,
};
use crate::app::AppState;
use crate::rules::{CANCELLED_BY_USER, RunStatus};
use crate::runs::CancelError;
use crate::store::{NodeCount, PageFilter, Run, now_ms};

/// Log lines a run's page shows; the whole log is a link away.
const LOG_TAIL: usize = 300;
/// A log line longer than this is cut on the page (not in the log).
const LOG_LINE_CHARS: usize = 2000;
/// Node rows shown unless the reader asks for all.
const NODE_ROWS: usize = 100;
/// Deferred parents listed by name.
const DEFERRED_LISTED: usize = 200;
/// A `run_results.json` larger than this gets no timeline.
const MAX_RUN_RESULTS_BYTES: u64 = 64 * 1024 * 1024;

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

fn seconds(run: &Run) -> Option<f64> {
    run.started_ms
        .map(|start| (run.finished_ms.unwrap_or_else(now_ms) - start).max(0) as f64 / 1000.0)
}

/// The summary counts from grouped node counts, by `summarize`'s one classification.
fn summary_of(counts: &[NodeCount]) -> Summary {
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

fn choices<'a>(values: impl Iterator<Item = &'a str>, chosen: Option<&str>) -> Vec<Choice> {
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

/// The facts at the top of a run's page.
pub struct Head {
    pub id: String,
    pub what: String,
    pub repository: String,
    pub kind: &'static str,
    pub pr: Option<u64>,
    pub pr_url: Option<String>,
    pub sha: Option<String>,
    pub sha_url: Option<String>,
    pub git_ref: String,
    pub isolation: Option<String>,
    pub status: &'static str,
    pub terminal: bool,
    pub message: Option<String>,
    pub attempt: u32,
    pub agent: Option<String>,
    pub created: String,
    pub started: Option<String>,
    pub finished: Option<String>,
    pub duration: Option<String>,
    pub timeout: String,
    pub compared_against: Option<(String, String)>,
    pub superseded_by: Option<String>,
    pub cancel_requested: bool,
    pub waiting: Option<String>,
    pub progress: (u32, u32),
    pub exit_code: Option<i32>,
    pub parse: Option<String>,
}

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

/// A run's page, ready to render (also what the benchmark times).
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
    nodes_matching: usize,
    filter_q: String,
    filter_status: String,
    node_statuses: Vec<Choice>,
    timeline: Option<String>,
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

fn size(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

/// The last `LOG_TAIL` lines of every attempt, numbered as the event stream numbers them
/// (from 1, across attempts), and how many there are.
fn log_tail(state: &AppState, run: &Run) -> WebResult<(Vec<String>, u64)> {
    let mut tail: VecDeque<String> = VecDeque::with_capacity(LOG_TAIL);
    let mut total = 0u64;
    for attempt in 1..=run.attempt.0 {
        let mut offset = 0;
        loop {
            let (lines, next) = state
                .logs
                .read_from(run.id, Attempt(attempt), offset)
                .map_err(|error| WebError::Internal(error.to_string()))?;
            if lines.is_empty() {
                break;
            }
            for line in lines {
                total += 1;
                if tail.len() == LOG_TAIL {
                    tail.pop_front();
                }
                tail.push_back(first_line(&line, LOG_LINE_CHARS));
            }
            offset = next;
        }
    }
    Ok((tail.into(), total))
}

/// The timeline from the run's `run_results.json`, if it uploaded one dbt wrote with timings.
async fn timeline(state: &AppState, id: RunId, has_results: bool) -> (Option<String>, String) {
    if !has_results {
        return (
            None,
            "no run_results.json (yet): dbt writes it when the build ends".to_owned(),
        );
    }
    let Ok(path) = state.artifacts.path(id, "run_results.json") else {
        return (None, String::new());
    };
    let read = tokio::task::spawn_blocking(move || -> Result<Timeline, String> {
        let length = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
        if length > MAX_RUN_RESULTS_BYTES {
            return Err(format!(
                "run_results.json is {} , too large to draw",
                size(length)
            ));
        }
        let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
        Timeline::from_run_results(&bytes).map_err(|e| e.to_string())
    })
    .await;
    match read {
        Ok(Ok(timeline)) if !timeline.bars.is_empty() => {
            let note = format!(
                "{} nodes over {} (from the first node's start to the last one's end)",
                timeline.bars.len(),
                duration(timeline.span_s())
            );
            (Some(timeline.svg()), note)
        }
        Ok(Ok(_)) => (None, "run_results.json has no node timings".to_owned()),
        Ok(Err(error)) => (None, error),
        Err(error) => (None, error.to_string()),
    }
}

/// Builds run `id`'s page for this request.
pub async fn run_page(
    state: &AppState,
    headers: &HeaderMap,
    id: RunId,
    query: &NodeQuery,
) -> WebResult<RunPage> {
    let run = state
        .store
        .run(id)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("no run {id}")))?;
    let mut phases = state.store.phases(id).await?;
    phases.sort_by_key(|phase| (phase.attempt, crate::store::phase_order(&phase.phase)));
    let nodes = state.store.nodes(id).await?;
    let artifacts = state.store.artifacts(id).await?;
    let queue_position = state.store.queue_position(&run).await?;
    let summary = summarize(&nodes);
    let github = state
        .config
        .repository(run.repository.as_str())
        .and_then(|repository| repository.github.clone())
        .and_then(|full_name| github_web(state, &full_name));
    let what = match (run.kind, run.pr) {
        (RunKind::Ci, Some(pr)) => format!("CI of {} PR #{}", run.repository, pr.0),
        (RunKind::Teardown, Some(pr)) => format!("Teardown of {} PR #{}", run.repository, pr.0),
        (RunKind::Publish, _) => format!("Production manifest published for {}", run.repository),
        _ => format!("Deploy of {}", run.repository),
    };
    let parse = run
        .caches
        .as_deref()
        .and_then(|json| serde_json::from_str::<slimci_proto::CacheReport>(json).ok())
        .and_then(|caches| {
            let parse = caches.parse?;
            Some(match caches.parse_reason {
                Some(reason) => format!("{parse} ({reason})"),
                None => parse,
            })
        });
    let head = Head {
        id: id.to_string(),
        what,
        repository: run.repository.to_string(),
        kind: run.kind.as_str(),
        pr: run.pr.map(|pr| pr.0),
        pr_url: github
            .as_ref()
            .zip(run.pr)
            .map(|(base, pr)| format!("{base}/pull/{}", pr.0)),
        sha: run.sha.as_ref().map(|sha| sha.to_string()),
        sha_url: github
            .as_ref()
            .zip(run.sha.as_ref())
            .map(|(base, sha)| format!("{base}/commit/{sha}")),
        git_ref: run.fetch_ref.clone(),
        isolation: run.isolation.as_ref().map(|name| name.to_string()),
        status: run.status.as_str(),
        terminal: run.status.is_terminal(),
        message: run.message.clone(),
        attempt: run.attempt.0,
        agent: run.agent.clone(),
        created: when(run.created_ms),
        started: run.started_ms.map(when),
        finished: run.finished_ms.map(when),
        duration: seconds(&run).map(duration),
        timeout: duration(run.timeout_secs as f64),
        compared_against: run.compared_against.as_ref().map(|stamp| {
            (
                stamp.deploy_run_id.to_string(),
                short_sha(stamp.sha.as_str()),
            )
        }),
        superseded_by: run.superseded_by.map(|id| id.to_string()),
        cancel_requested: run.cancel_requested,
        waiting: queue_position.map(|position| {
            Waiting {
                jobs_queue: Topology::new(&state.config.amqp.prefix).jobs_queue(),
                agents_consuming: state.fleet.agents_consuming(),
                runs_ahead: position.saturating_sub(1),
                queued_for_secs: u64::try_from((now_ms() - run.created_ms) / 1000)
                    .unwrap_or_default(),
            }
            .explain()
        }),
        progress: (run.progress_done, run.progress_total),
        exit_code: run.dbt_exit_code,
        parse,
    };

    // Failures first, then the slowest.
    let mut sorted: Vec<&NodeResult> = nodes.iter().collect();
    sorted.sort_by(|a, b| {
        is_failure(b)
            .cmp(&is_failure(a))
            .then(b.execution_time_s.total_cmp(&a.execution_time_s))
    });
    let filter_q = query.q.clone().unwrap_or_default().trim().to_owned();
    let filter_status = query.status.clone().unwrap_or_default();
    let needle = filter_q.to_lowercase();
    let matching: Vec<&NodeResult> = sorted
        .into_iter()
        .filter(|node| needle.is_empty() || node.unique_id.to_lowercase().contains(&needle))
        .filter(|node| match filter_status.as_str() {
            "" => true,
            "failures" => is_failure(node),
            status => node.status == status,
        })
        .collect();
    let show_all = query.all.is_some();
    let mut statuses: Vec<&str> = nodes.iter().map(|node| node.status.as_str()).collect();
    statuses.sort_unstable();
    statuses.dedup();
    let node_statuses = choices(
        std::iter::once("failures").chain(statuses),
        Some(filter_status.as_str()),
    );
    let node_rows = matching
        .iter()
        .take(if show_all { usize::MAX } else { NODE_ROWS })
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

    let has_results = artifacts
        .iter()
        .any(|artifact| artifact.name == "run_results.json");
    let (timeline_svg, timeline_note) = timeline(state, id, has_results).await;
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
        node_total: nodes.len(),
        nodes_matching: matching.len(),
        nodes: node_rows,
        filter_q,
        filter_status,
        node_statuses,
        timeline: timeline_svg,
        timeline_note,
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

fn parse_id(text: &str) -> WebResult<RunId> {
    RunId::parse(text).map_err(|error| WebError::BadRequest(error.to_string()))
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

#[derive(Deserialize)]
pub(super) struct EventsQuery {
    after: Option<u64>,
}

/// `GET /runs/{id}/events`: the API's log stream for the page's script, behind the page's
/// session. It resumes after `Last-Event-ID` (the browser's reconnect) or `?after=` (the
/// last line the page was rendered with).
pub(super) async fn events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
) -> WebResult<Response> {
    let id = parse_id(&id)?;
    let run = state
        .store
        .run(id)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("no run {id}")))?;
    let resume_after = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .or(query.after)
        .unwrap_or(0);
    Ok(crate::api::logs::follow_logs(state, run, resume_after).into_response())
}

/// `GET /runs/{id}/timeline.svg`: the build's timeline on its own (404 before dbt wrote
/// `run_results.json`).
pub(super) async fn timeline_svg(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> WebResult<Response> {
    let id = parse_id(&id)?;
    let has_results = state
        .store
        .artifacts(id)
        .await?
        .iter()
        .any(|artifact| artifact.name == "run_results.json");
    match timeline(&state, id, has_results).await {
        (Some(svg), _) => Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response()),
        (None, note) => Err(WebError::NotFound(format!(
            "run {id} has no timeline: {note}"
        ))),
    }
}

/// `GET /runs/{id}/log`: the whole log as text, behind the page's session.
pub(super) async fn log_text(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> WebResult<Response> {
    let id = parse_id(&id)?;
    let run = state
        .store
        .run(id)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("no run {id}")))?;
    let mut text = String::new();
    for attempt in 1..=run.attempt.0 {
        if run.attempt.0 > 1 {
            text.push_str(&format!("[slimci] attempt {attempt}\n"));
        }
        let mut offset = 0;
        loop {
            let (lines, next) = state
                .logs
                .read_from(id, Attempt(attempt), offset)
                .map_err(|error| WebError::Internal(error.to_string()))?;
            if lines.is_empty() {
                break;
            }
            for line in lines {
                text.push_str(&line);
                text.push('\n');
            }
            offset = next;
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// `GET /runs/{id}/artifacts/{name}`: a download, behind the page's session.
pub(super) async fn artifact(
    State(state): State<Arc<AppState>>,
    Path((id, name)): Path<(String, String)>,
) -> WebResult<Response> {
    let id = parse_id(&id)?;
    let path = state
        .artifacts
        .path(id, &name)
        .map_err(|error| WebError::BadRequest(error.to_string()))?;
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(WebError::NotFound(format!(
                "run {id} has no artifact `{name}`"
            )));
        }
        Err(error) => return Err(WebError::Internal(error.to_string())),
    };
    let content_type = if name.ends_with(".json") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::new(file)),
    )
        .into_response())
}
