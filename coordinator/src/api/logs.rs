//! `GET /api/v1/runs/{id}/logs`: a run's log as text, or with `?follow=true` as server-sent
//! events until the run ends.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use slimci_client::{LogEnd, Progress};
use tokio::sync::broadcast;
use tokio_stream::wrappers::ReceiverStream;

use super::{ApiError, ApiResult, load_run, parse_run_id, require_user};
use crate::app::AppState;
use crate::logs::LogCursor;
use crate::store::Run;

#[derive(Deserialize)]
pub(super) struct LogQuery {
    #[serde(default)]
    follow: bool,
}

pub(super) async fn get_logs(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> ApiResult<Response> {
    require_user(&state, &headers)?;
    let id = parse_run_id(&id)?;
    let run = load_run(&state, id).await?;
    if query.follow {
        // A client resuming after a dropped connection says which line it saw last.
        let resume_after = last_event_id(&headers).unwrap_or(0);
        return Ok(follow_logs(state, run, resume_after).into_response());
    }
    let text = state
        .logs
        .whole_text(id, run.attempt)
        .map_err(|error| ApiError::Internal(error.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// The last line a reconnecting event-stream client saw (`Last-Event-ID`).
pub(crate) fn last_event_id(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
}

/// Server-sent events: `log` (one line each, `id` = line number), `progress` (`{done,total}`),
/// and a final `end` carrying the run's terminal status, after which the stream closes.
pub(crate) fn follow_logs(state: Arc<AppState>, run: Run, resume_after: u64) -> impl IntoResponse {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(256);
    let mut changes = state.changes.subscribe();
    tokio::spawn(async move {
        let id = run.id;
        let mut cursor = LogCursor::new(id);
        let mut progress = (u32::MAX, u32::MAX);
        loop {
            let Ok(Some(run)) = state.store.run(id).await else {
                return;
            };
            // Every line so far, up to the current attempt.
            loop {
                let Ok(lines) = cursor.next_lines(&state.logs, run.attempt) else {
                    return;
                };
                if lines.is_empty() {
                    break;
                }
                for line in lines {
                    if line.number <= resume_after {
                        continue;
                    }
                    let event = Event::default()
                        .event("log")
                        .id(line.number.to_string())
                        .data(line.text);
                    if sender.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
            if (run.progress_done, run.progress_total) != progress {
                progress = (run.progress_done, run.progress_total);
                let data = serde_json::to_string(&Progress {
                    done: progress.0,
                    total: progress.1,
                })
                .expect("progress serializes");
                if sender
                    .send(Ok(Event::default().event("progress").data(data)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if run.status.is_terminal() {
                // The terminal status is written after the last log batch was applied; a
                // line written since the drain above is sent before the end.
                let drained = cursor
                    .clone()
                    .next_lines(&state.logs, run.attempt)
                    .map_or(true, |lines| lines.is_empty());
                if drained {
                    let data = serde_json::to_string(&LogEnd {
                        message: run.message,
                        status: run.status,
                    })
                    .expect("the end serializes");
                    let _ = sender
                        .send(Ok(Event::default().event("end").data(data)))
                        .await;
                    return;
                }
                continue;
            }
            // Wait for a change to this run; the timeout covers missed notifications.
            let deadline = tokio::time::sleep(Duration::from_secs(2));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    () = sender.closed() => return,
                    () = state.shutdown.cancelled() => return,
                    change = changes.recv() => match change {
                        Ok(changed) if changed != id => continue,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        }
    });
    Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
