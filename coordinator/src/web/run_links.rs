//! What a run's page links to: its log as text (`/runs/{id}/log`), the live log's event stream
//! (`/runs/{id}/events`), the build's timeline alone (`/runs/{id}/timeline.svg`), and its
//! artifacts (`/runs/{id}/artifacts/{name}`); all behind the page's session.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use slimci_proto::RunId;

use super::timeline::{Timeline, parents_from_manifest};
use super::{WebError, WebResult, duration};
use crate::api::artifacts::{Disposition, download};
use crate::api::logs::last_event_id;
use crate::app::AppState;
use crate::store::ArtifactRecord;

/// A `run_results.json` larger than this gets no timeline.
const MAX_RUN_RESULTS_BYTES: u64 = 64 * 1024 * 1024;
/// A `manifest.json` larger than this is not read for the critical path.
const MAX_MANIFEST_BYTES: u64 = 256 * 1024 * 1024;
/// Timelines kept drawn, the most recently drawn ones.
const TIMELINES_KEPT: usize = 16;

pub(super) fn parse_id(text: &str) -> WebResult<RunId> {
    RunId::parse(text).map_err(|error| WebError::BadRequest(error.to_string()))
}

pub(super) async fn load_run(state: &AppState, id: RunId) -> WebResult<crate::store::Run> {
    state
        .store
        .run(id)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("no run {id}")))
}

pub(super) fn size(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

/// A run's timeline as drawn: the SVG and the line that describes it.
pub struct DrawnTimeline {
    pub svg: Option<Arc<str>>,
    pub note: String,
}

/// Timelines drawn lately, by run and the sha256 of the `run_results.json` they were drawn
/// from: an uploaded artifact never changes under its hash, so a page shown again (a reload,
/// the live page's reload at the end) does not parse and draw it again.
static DRAWN: Mutex<VecDeque<Drawn>> = Mutex::new(VecDeque::new());

/// Held while a timeline is parsed and drawn, so one is at a time: every page open on a run
/// reloads when it ends, and each would otherwise parse the same artifacts (a manifest of up
/// to 256 MiB) at once; those after the first find it drawn.
static DRAWING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One timeline kept drawn.
struct Drawn {
    run: RunId,
    /// Of the `run_results.json` it was drawn from, and of the `manifest.json` whose
    /// dependencies gave its critical path.
    sha256: String,
    manifest_sha256: Option<String>,
    svg: Arc<str>,
    note: String,
}

/// The timeline of run `id` from its `run_results.json`, if dbt wrote one with timings, with
/// its critical path when the run's `manifest.json` is there too (`artifacts`: the run's).
pub(super) async fn timeline_of(
    state: &AppState,
    id: RunId,
    artifacts: &[ArtifactRecord],
) -> DrawnTimeline {
    let manifest = artifacts
        .iter()
        .find(|artifact| artifact.name == "manifest.json");
    let manifest_sha256 = manifest.map(|manifest| manifest.sha256.clone());
    let Some(results) = run_results_of(artifacts) else {
        return DrawnTimeline {
            svg: None,
            note: "no run_results.json (yet): dbt writes it when the build ends".to_owned(),
        };
    };
    let drawn_before = || {
        DRAWN
            .lock()
            .expect("timelines lock")
            .iter()
            .find(|drawn| {
                drawn.run == id
                    && drawn.sha256 == results.sha256
                    && drawn.manifest_sha256 == manifest_sha256
            })
            .map(|drawn| DrawnTimeline {
                svg: Some(drawn.svg.clone()),
                note: drawn.note.clone(),
            })
    };
    if let Some(drawn) = drawn_before() {
        return drawn;
    }
    let _drawing = DRAWING.lock().await;
    if let Some(drawn) = drawn_before() {
        return drawn;
    }
    let Ok(path) = state.artifacts.path(id, "run_results.json") else {
        return DrawnTimeline {
            svg: None,
            note: String::new(),
        };
    };
    let manifest_path = manifest.and_then(|_| state.artifacts.path(id, "manifest.json").ok());
    let read = tokio::task::spawn_blocking(move || -> Result<Timeline, String> {
        let length = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
        if length > MAX_RUN_RESULTS_BYTES {
            return Err(format!(
                "run_results.json is {}, too large to draw",
                size(length)
            ));
        }
        let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
        let timeline = Timeline::from_run_results(&bytes).map_err(|e| e.to_string())?;
        // The critical path needs the dependencies; a manifest that cannot be read leaves the
        // timeline without it.
        let parents = manifest_path
            .filter(|path| {
                std::fs::metadata(path).is_ok_and(|meta| meta.len() <= MAX_MANIFEST_BYTES)
            })
            .and_then(|path| std::fs::read(path).ok())
            .and_then(|bytes| parents_from_manifest(&bytes).ok());
        Ok(match parents {
            Some(parents) => timeline.with_critical_path(&parents),
            None => timeline,
        })
    })
    .await;
    let timeline = match read {
        Ok(Ok(timeline)) if !timeline.bars.is_empty() => timeline,
        Ok(Ok(_)) => {
            return DrawnTimeline {
                svg: None,
                note: "run_results.json has no node timings".to_owned(),
            };
        }
        Ok(Err(note)) => return DrawnTimeline { svg: None, note },
        Err(error) => {
            return DrawnTimeline {
                svg: None,
                note: error.to_string(),
            };
        }
    };
    let mut note = format!(
        "{} nodes over {} (from the first node's start to the last one's end)",
        timeline.bars.len(),
        duration(timeline.span_s())
    );
    if !timeline.critical.is_empty() {
        note.push_str(&format!(
            "; outlined, the critical path: {} nodes, {}, each waiting for the one before it",
            timeline.critical.len(),
            duration(timeline.critical_s())
        ));
    }
    let svg: Arc<str> = timeline.svg().into();
    let mut drawn = DRAWN.lock().expect("timelines lock");
    if drawn.len() == TIMELINES_KEPT {
        drawn.pop_front();
    }
    drawn.push_back(Drawn {
        run: id,
        sha256: results.sha256.clone(),
        manifest_sha256,
        svg: svg.clone(),
        note: note.clone(),
    });
    DrawnTimeline {
        svg: Some(svg),
        note,
    }
}

/// The record of run `id`'s `run_results.json`, once uploaded.
pub(super) fn run_results_of(artifacts: &[ArtifactRecord]) -> Option<&ArtifactRecord> {
    artifacts
        .iter()
        .find(|artifact| artifact.name == "run_results.json")
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
    let run = load_run(&state, parse_id(&id)?).await?;
    let resume_after = last_event_id(&headers).or(query.after).unwrap_or(0);
    Ok(crate::api::logs::follow_logs(state, run, resume_after).into_response())
}

/// `GET /runs/{id}/timeline.svg`: the build's timeline on its own (404 before dbt wrote
/// `run_results.json`).
pub(super) async fn timeline_svg(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> WebResult<Response> {
    let id = parse_id(&id)?;
    let artifacts = state.store.artifacts(id).await?;
    match timeline_of(&state, id, &artifacts).await {
        DrawnTimeline { svg: Some(svg), .. } => Ok((
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                (header::CACHE_CONTROL, "private, max-age=300"),
            ],
            svg.to_string(),
        )
            .into_response()),
        DrawnTimeline { svg: None, note } => Err(WebError::NotFound(format!(
            "run {id} has no timeline: {note}"
        ))),
    }
}

/// `GET /runs/{id}/log`: the whole log as text.
pub(super) async fn log_text(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> WebResult<Response> {
    let run = load_run(&state, parse_id(&id)?).await?;
    let text = state
        .logs
        .whole_text(run.id, run.attempt)
        .map_err(|error| WebError::Internal(error.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// `GET /runs/{id}/artifacts/{name}`: a download, behind the page's session.
pub(super) async fn artifact(
    State(state): State<Arc<AppState>>,
    Path((id, name)): Path<(String, String)>,
) -> WebResult<Response> {
    let id = parse_id(&id)?;
    Ok(download(&state, id, &name, Disposition::Attachment).await?)
}
