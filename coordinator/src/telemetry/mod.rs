//! The coordinator's part of a run's trace. A run's trace starts when the run is made
//! (`new_trace`: its root span's ids are chosen and stored with the run as its
//! `traceparent`; `origin`: the span of what made it, a request or the sweeper's finding);
//! every later span joins it as a child of that root: the wait in
//! the outbox and the PRODUCER span of each dispatch (`start_dispatch`, whose `traceparent`
//! travels in the job message's AMQP headers, so the agent's spans are its children), each
//! lost attempt, each GitHub report. The root span itself is exported once the run ended
//! (`trace_end_loop`), from the run's request to its end, whatever ended it.
//!
//! A publish (a manifest published from outside, never built) is one request: its trace is
//! `publish::PublishTrace`, root included.
//!
//! With traces off (`AppState::telemetry` has no tracer) every function here returns at
//! once and no run gets a `traceparent`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _};
use opentelemetry::{Context, KeyValue};
use slimci_telemetry::{Finished, TraceParent, semconv, time_from_ms};
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::rules::RunStatus;
use crate::store::Run;

pub mod publish;

/// A span's error description for a run that ended `status`: fixed words, never the run's
/// message (which can quote a node's message or dbt's error text).
fn status_description(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Queued | RunStatus::Running => "run not finished",
        RunStatus::Success => "run succeeded",
        RunStatus::Failed => "run failed",
        RunStatus::Error => "run errored",
        RunStatus::Cancelled => "run cancelled",
        RunStatus::Superseded => "run superseded",
        RunStatus::TimedOut => "run timed out",
    }
}

/// The root span's error: the run ended without a result it asked for (not a success, a
/// cancel or a supersede).
fn root_error(run: &Run) -> Option<&'static str> {
    let failed = !matches!(
        run.status,
        RunStatus::Success | RunStatus::Cancelled | RunStatus::Superseded
    );
    failed.then(|| status_description(run.status))
}

/// The request span's error: the request ended its run at once (refused it, or found it done).
fn request_error(run: &Run) -> Option<&'static str> {
    run.status
        .is_terminal()
        .then(|| status_description(run.status))
}

/// What every span of a run says about it.
pub fn run_attributes(run: &Run) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new(
            semconv::CICD_PIPELINE_NAME,
            format!("{} {}", run.repository, run.kind.as_str()),
        ),
        KeyValue::new(semconv::CICD_PIPELINE_RUN_ID, run.id.to_string()),
        KeyValue::new(semconv::VCS_REPOSITORY_NAME, run.repository.to_string()),
        KeyValue::new(semconv::VCS_REF_HEAD_NAME, run.fetch_ref.clone()),
        KeyValue::new(semconv::SLIMCI_RUN_KIND, run.kind.as_str()),
    ];
    if let Some(pr) = run.pr {
        attributes.push(KeyValue::new(semconv::VCS_CHANGE_ID, pr.0.to_string()));
    }
    if let Some(isolation) = &run.isolation {
        attributes.push(KeyValue::new(
            semconv::SLIMCI_ISOLATION_NAME,
            isolation.as_str().to_owned(),
        ));
    }
    if let Some(sha) = &run.sha {
        attributes.push(KeyValue::new(
            semconv::VCS_REF_HEAD_REVISION,
            sha.as_str().to_owned(),
        ));
    }
    attributes
}

/// The run's root span, as a parent; none when the run has no trace.
fn root_of(run: &Run) -> Option<Context> {
    run.traceparent
        .as_deref()
        .and_then(TraceParent::parse)
        .map(|root| root.context())
}

/// The run's trace id (32 hex digits), when its trace is exported: what the API's run view and
/// the run's page show.
pub fn trace_id(run: &Run) -> Option<String> {
    run.traceparent
        .as_deref()
        .and_then(TraceParent::parse)
        .map(|root| root.trace_id.to_string())
}

/// The `traceparent` of a new run's root span, stored with the run; none when traces are off.
pub fn new_trace(state: &AppState) -> Option<String> {
    state
        .telemetry
        .tracer()
        .map(|_| TraceParent::new_root().to_header())
}

/// What made a run, as its trace shows it.
pub enum Origin {
    /// A request: the API, the CLI or a webhook.
    Request,
    /// The sweeper found a PR's isolation left behind (`sweeper.rs`).
    Sweep(SweepFinding),
}

/// Why the sweeper queued a teardown, and how it found out.
pub struct SweepFinding {
    /// When it started looking at the PR.
    pub started: SystemTime,
    /// Why the isolation is left behind: `closed on GitHub`, `unknown to GitHub`, ...
    pub reason: &'static str,
    /// When it asked GitHub for the PR's state, and when the answer came; none when it had
    /// only the webhooks' word.
    pub asked_github: Option<(SystemTime, SystemTime)>,
    /// Hours since the PR's last build ended.
    pub last_build_hours: f64,
}

/// Exports the span of what made `run`: the request, arrived at `requested_at` (a SERVER span),
/// or the sweeper's finding with its question to GitHub.
pub fn origin(state: &AppState, run: &Run, requested_at: SystemTime, origin: &Origin) {
    let (Some(tracer), Some(root)) = (state.telemetry.tracer(), root_of(run)) else {
        return;
    };
    let finding = match origin {
        Origin::Request => {
            Finished {
                name: format!("request {} run", run.kind.as_str()),
                kind: SpanKind::Server,
                parent: &root,
                start: requested_at,
                end: SystemTime::now(),
                attributes: run_attributes(run),
                error: request_error(run).map(str::to_owned),
                ids: None,
            }
            .emit(tracer);
            return;
        }
        Origin::Sweep(finding) => finding,
    };
    let mut attributes = run_attributes(run);
    attributes.extend([
        KeyValue::new(semconv::SLIMCI_SWEEP_REASON, finding.reason),
        KeyValue::new(
            semconv::SLIMCI_SWEEP_LAST_BUILD_HOURS,
            (finding.last_build_hours * 10.0).round() / 10.0,
        ),
    ]);
    let sweep = Finished {
        name: "sweep left-behind isolation".to_owned(),
        kind: SpanKind::Internal,
        parent: &root,
        start: finding.started,
        end: SystemTime::now(),
        attributes: attributes.clone(),
        error: None,
        ids: None,
    }
    .emit(tracer);
    if let Some((asked, answered)) = finding.asked_github {
        Finished {
            name: "GitHub pull request state".to_owned(),
            kind: SpanKind::Client,
            parent: &sweep.context(),
            start: asked,
            end: answered,
            attributes,
            error: None,
            ids: None,
        }
        .emit(tracer);
    }
}

/// A dispatch of one attempt: the PRODUCER span, open while its job is published.
pub struct Dispatch {
    span: opentelemetry_sdk::trace::Span,
    pub traceparent: TraceParent,
}

impl Dispatch {
    /// The broker confirmed the job (`None`), or refused it.
    pub fn end(mut self, error: Option<String>) {
        if let Some(error) = error {
            self.span.set_status(Status::error(error));
        }
        self.span.end();
    }
}

/// Exports the attempt's wait in the outbox (since the request, for the first attempt; since
/// the last attempt was lost, for a retry: the run's `queued_ms`) and starts the dispatch's
/// PRODUCER span.
pub fn start_dispatch(state: &AppState, run: &Run, queue: &str) -> Option<Dispatch> {
    let tracer = state.telemetry.tracer()?;
    let root = root_of(run)?;
    let mut attributes = run_attributes(run);
    attributes.push(KeyValue::new(
        semconv::SLIMCI_RUN_ATTEMPT,
        i64::from(run.attempt.0),
    ));
    Finished {
        name: format!("queued (attempt {})", run.attempt),
        kind: SpanKind::Internal,
        parent: &root,
        start: time_from_ms(run.queued_ms),
        end: SystemTime::now(),
        attributes: attributes.clone(),
        error: None,
        ids: None,
    }
    .emit(tracer);
    attributes.extend([
        KeyValue::new(semconv::MESSAGING_SYSTEM, "rabbitmq"),
        KeyValue::new(semconv::MESSAGING_DESTINATION_NAME, queue.to_owned()),
        KeyValue::new(semconv::MESSAGING_OPERATION_TYPE, "send"),
    ]);
    let span = tracer
        .span_builder(format!("send {queue}"))
        .with_kind(SpanKind::Producer)
        .with_attributes(attributes)
        .start_with_context(tracer, &root);
    let traceparent = TraceParent::of(span.span_context());
    Some(Dispatch { span, traceparent })
}

/// An attempt was lost (its lease ran out, or its agent released it): a mark in the trace.
pub fn attempt_lost(state: &AppState, run: &Run, reason: &str, retried: bool) {
    let (Some(tracer), Some(root)) = (state.telemetry.tracer(), root_of(run)) else {
        return;
    };
    let now = SystemTime::now();
    let mut attributes = run_attributes(run);
    attributes.extend([
        KeyValue::new(semconv::SLIMCI_RUN_ATTEMPT, i64::from(run.attempt.0)),
        KeyValue::new("slimci.attempt.retried", retried),
    ]);
    Finished {
        name: format!("attempt {} lost", run.attempt),
        kind: SpanKind::Internal,
        parent: &root,
        start: now,
        end: now,
        attributes,
        error: Some(reason.to_owned()),
        ids: None,
    }
    .emit(tracer);
}

/// One report of the run to GitHub, from `start` to now.
pub fn github_report(state: &AppState, run: &Run, start: SystemTime, error: Option<String>) {
    let (Some(tracer), Some(root)) = (state.telemetry.tracer(), root_of(run)) else {
        return;
    };
    let mut attributes = run_attributes(run);
    attributes.push(KeyValue::new(
        semconv::SLIMCI_RUN_STATUS,
        run.status.as_str(),
    ));
    Finished {
        name: "report to GitHub".to_owned(),
        kind: SpanKind::Client,
        parent: &root,
        start,
        end: SystemTime::now(),
        attributes,
        error,
        ids: None,
    }
    .emit(tracer);
}

/// Exports the root span of every run that ended, from its request to its end. Runs only
/// while traces are exported.
pub async fn trace_end_loop(state: Arc<AppState>, shutdown: CancellationToken) {
    if state.telemetry.tracer().is_none() {
        return;
    }
    let mut changes = state.changes.subscribe();
    loop {
        end_traces(&state).await;
        tokio::select! {
            () = shutdown.cancelled() => {
                end_traces(&state).await;
                return;
            }
            _ = changes.recv() => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

async fn end_traces(state: &AppState) {
    let Some(tracer) = state.telemetry.tracer() else {
        return;
    };
    let runs = match state.store.runs_to_end_trace(200).await {
        Ok(runs) => runs,
        Err(error) => {
            tracing::warn!(%error, "cannot read the runs whose trace ended");
            return;
        }
    };
    for run in runs {
        let Some(root) = run.traceparent.as_deref().and_then(TraceParent::parse) else {
            continue;
        };
        let mut attributes = run_attributes(&run);
        attributes.extend([
            KeyValue::new(
                semconv::CICD_PIPELINE_RESULT,
                semconv::pipeline_result(run.status.as_str()),
            ),
            KeyValue::new(semconv::SLIMCI_RUN_STATUS, run.status.as_str()),
            KeyValue::new(semconv::SLIMCI_RUN_ATTEMPT, i64::from(run.attempt.0)),
        ]);
        if let Some(agent) = &run.agent {
            attributes.push(KeyValue::new(semconv::CICD_WORKER_NAME, agent.clone()));
        }
        Finished {
            name: format!("{} run", run.kind.as_str()),
            kind: SpanKind::Internal,
            parent: &Context::new(),
            start: time_from_ms(run.created_ms),
            end: time_from_ms(run.finished_ms.unwrap_or(run.created_ms)),
            attributes,
            error: root_error(&run).map(str::to_owned),
            ids: Some(root),
        }
        .emit(tracer);
        if let Err(error) = state.store.set_trace_ended(run.id).await {
            tracing::warn!(%error, run = %run.id, "cannot mark the run's trace ended");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewRun;
    use crate::store::testing::{new_run, store};
    use slimci_proto::RunKind;

    const DBT_ERROR: &str =
        "Database Error in model customers: column \"card_number\" = '4111' does not exist";

    async fn stored(status: RunStatus) -> Run {
        let (_dir, store) = store().await;
        let run = NewRun {
            status,
            message: Some(DBT_ERROR.to_owned()),
            ..new_run(RunKind::Ci)
        };
        store.insert_run(&run).await.unwrap();
        store.run(run.id).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn span_errors_say_how_the_run_ended_never_its_message() {
        let failed = stored(RunStatus::Failed).await;
        assert_eq!(failed.message.as_deref(), Some(DBT_ERROR));
        assert_eq!(root_error(&failed), Some("run failed"));
        assert_eq!(request_error(&failed), Some("run failed"));
        let errored = stored(RunStatus::Error).await;
        assert_eq!(root_error(&errored), Some("run errored"));
        assert_eq!(request_error(&errored), Some("run errored"));
        let timed_out = stored(RunStatus::TimedOut).await;
        assert_eq!(root_error(&timed_out), Some("run timed out"));
        let superseded = stored(RunStatus::Superseded).await;
        assert_eq!(root_error(&superseded), None);
        let queued = stored(RunStatus::Queued).await;
        assert_eq!(request_error(&queued), None);
    }
}
