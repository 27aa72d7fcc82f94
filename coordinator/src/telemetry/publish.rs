//! A publish's trace. A publish (`POST /api/v1/repositories/{name}/production-state`) is one
//! request and never built, so its whole trace is made here, root included: the root spans the
//! request, and its steps are children (`receive manifest`, `check manifest`, `record
//! production state`). The run is recorded with the root's `traceparent` and its trace already
//! ended (`Store::record_publish`), so `trace_end_loop` never exports a second root. A refused
//! publish records no run, but its trace still ends, in error, saying why.

use std::time::SystemTime;

use opentelemetry::trace::SpanKind;
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;
use slimci_proto::{RepoName, RunId, RunKind, Sha};
use slimci_telemetry::{Finished, TraceParent, semconv};

use crate::app::AppState;

/// The trace of one publish, from its request on.
pub struct PublishTrace {
    tracer: SdkTracer,
    root: TraceParent,
    parent: Context,
    requested_at: SystemTime,
    attributes: Vec<KeyValue>,
}

impl PublishTrace {
    /// Starts the trace of publish run `id` as its request arrives; none when traces are off.
    pub fn start(
        state: &AppState,
        id: RunId,
        repository: &RepoName,
        sha: &Sha,
        fetch_ref: &str,
    ) -> Option<PublishTrace> {
        let tracer = state.telemetry.tracer()?.clone();
        let root = TraceParent::new_root();
        let kind = RunKind::Publish.as_str();
        Some(PublishTrace {
            tracer,
            root,
            parent: root.context(),
            requested_at: SystemTime::now(),
            attributes: vec![
                KeyValue::new(semconv::CICD_PIPELINE_NAME, format!("{repository} {kind}")),
                KeyValue::new(semconv::CICD_PIPELINE_RUN_ID, id.to_string()),
                KeyValue::new(semconv::VCS_REPOSITORY_NAME, repository.to_string()),
                KeyValue::new(semconv::VCS_REF_HEAD_NAME, fetch_ref.to_owned()),
                KeyValue::new(semconv::VCS_REF_HEAD_REVISION, sha.as_str().to_owned()),
                KeyValue::new(semconv::SLIMCI_RUN_KIND, kind),
            ],
        })
    }

    /// The `traceparent` the publish run is recorded with (its trace id is the run's).
    pub fn traceparent(&self) -> String {
        self.root.to_header()
    }

    /// One step of the publish, from `start` to now, with what it learnt (`facts`).
    pub fn step(&self, name: &str, start: SystemTime, facts: Vec<KeyValue>, error: Option<String>) {
        let mut attributes = self.attributes.clone();
        attributes.push(KeyValue::new(
            semconv::CICD_PIPELINE_TASK_NAME,
            name.to_owned(),
        ));
        attributes.push(KeyValue::new(
            semconv::CICD_PIPELINE_TASK_RUN_RESULT,
            if error.is_none() { "success" } else { "error" },
        ));
        attributes.extend(facts);
        Finished {
            name: name.to_owned(),
            kind: SpanKind::Internal,
            parent: &self.parent,
            start,
            end: SystemTime::now(),
            attributes,
            error,
            ids: None,
        }
        .emit(&self.tracer);
    }

    /// The publish ended: the manifest is the production state (`error` none: the run's
    /// status is `success`), or it was refused (status `refused`, result `error`) and no run
    /// was recorded. Exports the root.
    pub fn end(self, error: Option<String>) {
        let mut attributes = self.attributes;
        let status = if error.is_none() {
            "success"
        } else {
            "refused"
        };
        attributes.extend([
            KeyValue::new(
                semconv::CICD_PIPELINE_RESULT,
                semconv::pipeline_result(status),
            ),
            KeyValue::new(semconv::SLIMCI_RUN_STATUS, status),
        ]);
        Finished {
            name: format!("{} run", RunKind::Publish.as_str()),
            kind: SpanKind::Server,
            parent: &Context::new(),
            start: self.requested_at,
            end: SystemTime::now(),
            attributes,
            error,
            ids: Some(self.root),
        }
        .emit(&self.tracer);
    }
}
