//! The agent's part of a run's trace. A job message carries the W3C `traceparent` of the
//! coordinator's PRODUCER span in its AMQP headers; the agent's CONSUMER span for the attempt is
//! its child (`AttemptTrace::start`), and everything the attempt does hangs under it: the
//! claim, each phase, and inside `build` one span per dbt node with the start and end dbt
//! recorded in `run_results.json`, so a trace viewer shows the build's critical path.
//!
//! Spans whose times are known only afterwards (phases, nodes) are exported when they end,
//! with their real start. No attribute carries a secret or a log line: names, ids, statuses,
//! relations and counts only. Without a tracer (traces off), or for a job message without a
//! `traceparent`, there is no `AttemptTrace` and none of this runs.

use std::time::SystemTime;

use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _};
use opentelemetry::{Context, KeyValue};
use slimci_proto::{AgentName, CheckedJob, NodeResult, Phase};
use slimci_telemetry::{Finished, Telemetry, TraceParent, semconv, time_from};

/// One attempt's place in its run's trace.
pub struct AttemptTrace {
    tracer: opentelemetry_sdk::trace::SdkTracer,
    /// The attempt's CONSUMER span, parent of everything below.
    parent: Context,
    pub trace_id: String,
    run_id: String,
    attempt: u32,
    attributes: Vec<KeyValue>,
}

/// The CONSUMER span, open for the whole attempt.
pub struct ConsumerSpan(opentelemetry_sdk::trace::Span);

impl ConsumerSpan {
    /// The attempt ended: `result` as the agent reports it (`released` when it gave it up).
    pub fn end(mut self, result: &str) {
        self.0.set_attribute(KeyValue::new(
            semconv::CICD_PIPELINE_TASK_RUN_RESULT,
            semconv::pipeline_result(result),
        ));
        if !matches!(result, "success" | "cancelled") {
            self.0.set_status(Status::error(result.to_owned()));
        }
        self.0.end();
    }
}

impl AttemptTrace {
    /// The attempt's trace, if traces are exported and the job message came with a
    /// `traceparent`; the CONSUMER span starts now.
    pub fn start(
        telemetry: &Telemetry,
        headers: Option<&lapin::types::FieldTable>,
        job: &CheckedJob,
        agent: &AgentName,
        queue: &str,
    ) -> Option<(AttemptTrace, ConsumerSpan)> {
        let tracer = telemetry.tracer()?;
        let producer = slimci_telemetry::extract(headers)?;
        let mut attributes = vec![
            KeyValue::new(
                semconv::CICD_PIPELINE_NAME,
                format!("{} {}", job.repository, job.run_kind().as_str()),
            ),
            KeyValue::new(semconv::CICD_PIPELINE_RUN_ID, job.run_id.to_string()),
            KeyValue::new(semconv::CICD_WORKER_NAME, agent.to_string()),
            KeyValue::new(semconv::VCS_REPOSITORY_NAME, job.repository.to_string()),
            KeyValue::new(semconv::SLIMCI_RUN_KIND, job.run_kind().as_str()),
            KeyValue::new(semconv::SLIMCI_RUN_ATTEMPT, i64::from(job.attempt.0)),
        ];
        if let Some(sha) = &job.git.sha {
            attributes.push(KeyValue::new(
                semconv::VCS_REF_HEAD_REVISION,
                sha.as_str().to_owned(),
            ));
        }
        if let slimci_proto::JobKind::Ci { pr, isolation, .. }
        | slimci_proto::JobKind::Teardown { pr, isolation } = &job.kind
        {
            attributes.extend([
                KeyValue::new(semconv::VCS_CHANGE_ID, pr.0.to_string()),
                KeyValue::new(
                    semconv::SLIMCI_ISOLATION_NAME,
                    isolation.as_str().to_owned(),
                ),
            ]);
        }
        let mut span_attributes = attributes.clone();
        span_attributes.extend([
            KeyValue::new(semconv::MESSAGING_SYSTEM, "rabbitmq"),
            KeyValue::new(semconv::MESSAGING_DESTINATION_NAME, queue.to_owned()),
            KeyValue::new(semconv::MESSAGING_OPERATION_TYPE, "process"),
        ]);
        let span = tracer
            .span_builder(format!("process {queue}"))
            .with_kind(SpanKind::Consumer)
            .with_attributes(span_attributes)
            .start_with_context(tracer, &producer.context());
        let consumer = TraceParent::of(span.span_context());
        Some((
            AttemptTrace {
                tracer: tracer.clone(),
                parent: consumer.context(),
                trace_id: consumer.trace_id.to_string(),
                run_id: job.run_id.to_string(),
                attempt: job.attempt.0,
                attributes,
            },
            ConsumerSpan(span),
        ))
    }

    fn emit(&self, finished: Finished<'_>) -> TraceParent {
        finished.emit(&self.tracer)
    }

    /// The claim, sent at `start`: granted, refused, or failed.
    pub fn claim(&self, start: SystemTime, answer: &str, granted: bool) {
        let mut attributes = self.attributes.clone();
        attributes.push(KeyValue::new("slimci.claim.answer", answer.to_owned()));
        self.emit(Finished {
            name: "claim".to_owned(),
            kind: SpanKind::Client,
            parent: &self.parent,
            start,
            end: SystemTime::now(),
            attributes,
            error: (!granted).then(|| answer.to_owned()),
            ids: None,
        });
    }

    /// One phase, from `start` to now; its identity, as the parent of the build's nodes.
    pub fn phase(&self, phase: Phase, start: SystemTime, ok: bool) -> TraceParent {
        let mut attributes = self.attributes.clone();
        attributes.extend([
            KeyValue::new(semconv::CICD_PIPELINE_TASK_NAME, phase.as_str()),
            KeyValue::new(
                semconv::CICD_PIPELINE_TASK_RUN_ID,
                format!("{}/{}/{}", self.run_id, self.attempt, phase.as_str()),
            ),
            KeyValue::new(
                semconv::CICD_PIPELINE_TASK_RUN_RESULT,
                if ok { "success" } else { "failure" },
            ),
        ]);
        self.emit(Finished {
            name: phase.as_str().to_owned(),
            kind: SpanKind::Internal,
            parent: &self.parent,
            start,
            end: SystemTime::now(),
            attributes,
            error: (!ok).then(|| format!("{} did not succeed", phase.as_str())),
            ids: None,
        })
    }

    /// One span per node dbt ran, under the build's span, with dbt's own start and end.
    /// Nodes dbt did not run (skipped, no timing) have no span.
    pub fn nodes(&self, build: TraceParent, nodes: &[NodeResult]) {
        let parent = build.context();
        for node in nodes {
            let (Some(started), Some(completed)) = (node.started_at, node.completed_at) else {
                continue;
            };
            let mut attributes = vec![
                KeyValue::new(semconv::CICD_PIPELINE_RUN_ID, self.run_id.clone()),
                KeyValue::new(semconv::DBT_NODE_UNIQUE_ID, node.unique_id.clone()),
                KeyValue::new(semconv::DBT_NODE_RESOURCE_TYPE, node.resource_type.clone()),
                KeyValue::new(semconv::DBT_NODE_STATUS, node.status.clone()),
            ];
            if let Some(relation) = &node.relation {
                attributes.push(KeyValue::new(semconv::DBT_NODE_RELATION, relation.clone()));
            }
            if let Some(response) = &node.adapter_response {
                if let Some(rows) = response
                    .get("rows_affected")
                    .and_then(serde_json::Value::as_i64)
                {
                    attributes.push(KeyValue::new(semconv::DBT_NODE_ROWS_AFFECTED, rows));
                }
                if let Some(query_id) = response.get("query_id").and_then(|id| id.as_str()) {
                    attributes.push(KeyValue::new(
                        semconv::DBT_NODE_QUERY_ID,
                        query_id.to_owned(),
                    ));
                }
            }
            self.emit(Finished {
                name: node.unique_id.clone(),
                kind: SpanKind::Internal,
                parent: &parent,
                start: time_from(started),
                end: time_from(completed),
                attributes,
                error: slimci_client::is_failure(node).then(|| node.status.clone()),
                ids: None,
            });
        }
    }
}
