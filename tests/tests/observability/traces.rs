//! A run's trace, exported over OTLP/HTTP and over OTLP/gRPC to a receiver in the test: one
//! trace across coordinator, RabbitMQ and agent, with a span per dbt node; a retried attempt
//! joins it.

use std::collections::BTreeSet;

use serde_json::json;
use slimci_client::RunRequest;
use slimci_proto::Attempt;
use slimci_tests::otlp::{
    OtlpReceiver, ReceivedSpan, SPAN_KIND_CONSUMER, SPAN_KIND_PRODUCER, SPAN_KIND_SERVER,
};
use slimci_tests::{
    Cluster, ClusterOptions, ci_request, deploy_request, edits, nodes_of, wait_for,
};

use crate::{TIMEOUT, stub_options};

/// `[telemetry]` exporting to the test's receiver; spans leave the agents within 200 ms.
pub(crate) fn exporting_to(receiver: &OtlpReceiver) -> (String, Vec<(String, String)>) {
    let toml = format!(
        "[telemetry]\nenabled = true\nendpoint = \"{}\"\nmetrics_interval_secs = 1\n",
        receiver.url
    );
    let env = vec![("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned())];
    (toml, env)
}

/// Waits until the root span of the trace arrived (exported when the run ended) and
/// `consumers` CONSUMER spans (each exported when its agent ended its attempt), then returns
/// every span of that trace.
pub(crate) async fn trace_of(
    receiver: &OtlpReceiver,
    trace_id: &str,
    consumers: usize,
) -> Vec<ReceivedSpan> {
    wait_for(
        "the run's root span and its attempts' spans",
        TIMEOUT,
        || async {
            let spans = receiver.spans();
            let ours = || spans.iter().filter(|span| span.trace_id == trace_id);
            let root = ours().any(|span| span.parent_span_id.is_empty());
            let attempts = ours()
                .filter(|span| span.kind == SPAN_KIND_CONSUMER)
                .count();
            Ok((root && attempts >= consumers).then_some(()))
        },
    )
    .await
    .unwrap();
    receiver
        .spans()
        .into_iter()
        .filter(|span| span.trace_id == trace_id)
        .collect()
}

pub(crate) fn one<'a>(
    spans: &'a [ReceivedSpan],
    what: &str,
    test: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|span| test(span)).collect();
    assert_eq!(found.len(), 1, "{what}: {found:#?}\nof {spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_build_is_one_trace_across_coordinator_broker_and_agent() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let (toml, env) = exporting_to(&receiver);
    let cluster = Cluster::start(ClusterOptions {
        coordinator_toml: toml.clone(),
        agent_toml: toml,
        agent_env: env,
        ..Default::default()
    })
    .await
    .unwrap();
    a_pull_request_build_is_one_trace(&receiver, cluster).await;
}

/// The same trace over OTLP/gRPC: the coordinator told by `[telemetry]`, the agent by the
/// standard variables alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_a_pull_request_build_is_one_trace_across_coordinator_broker_and_agent() {
    let receiver = OtlpReceiver::start_grpc().await.unwrap();
    let cluster = Cluster::start(ClusterOptions {
        coordinator_toml: format!(
            "[telemetry]\nenabled = true\nprotocol = \"grpc\"\nendpoint = \"{}\"\nmetrics_interval_secs = 1\n",
            receiver.url
        ),
        agent_env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), receiver.url.clone()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(), "grpc".to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned()),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    a_pull_request_build_is_one_trace(&receiver, cluster).await;
}

/// Deploys, builds a PR, and checks the PR build's trace as `receiver` got it: spans from both
/// processes, the agent's attempt a child of the dispatch across RabbitMQ, one span per node.
async fn a_pull_request_build_is_one_trace(receiver: &OtlpReceiver, mut cluster: Cluster) {
    cluster.deploy().await.unwrap();
    let sha = cluster
        .origin
        .pull_request(1, &[edits::ADD_COLUMN])
        .unwrap();
    let run = cluster.create_run(&ci_request(1, &sha)).await.unwrap();
    let trace_id = run.trace_id.clone().expect("a traced run has a trace id");
    assert_eq!(trace_id.len(), 32);
    let run = cluster.wait_for_success(run.id, TIMEOUT).await.unwrap();
    assert_eq!(run.trace_id.as_deref(), Some(trace_id.as_str()));
    let log = cluster.log(run.id).await.unwrap();
    assert!(log.contains(&format!("trace {trace_id}")), "{log}");

    let spans = trace_of(receiver, &trace_id, 1).await;
    let services: BTreeSet<&str> = spans.iter().map(|span| span.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from(["slimci-agent", "slimci-coordinator"]),
        "{spans:#?}"
    );
    let root = one(&spans, "the root", |span| span.parent_span_id.is_empty());
    assert_eq!(root.name, "ci run");
    assert_eq!(root.service, "slimci-coordinator");
    assert_eq!(root.attributes["cicd.pipeline.run.id"], run.id.to_string());
    assert_eq!(root.attributes["cicd.pipeline.result"], "success");
    assert_eq!(root.attributes["cicd.pipeline.name"], "shop ci");
    assert_eq!(root.attributes["vcs.change.id"], "1");
    assert_eq!(root.attributes["vcs.ref.head.revision"], sha);
    let request = one(&spans, "the request", |span| span.kind == SPAN_KIND_SERVER);
    assert_eq!(request.parent_span_id, root.span_id);
    let producer = one(&spans, "the dispatch", |span| {
        span.kind == SPAN_KIND_PRODUCER
    });
    assert_eq!(producer.parent_span_id, root.span_id);
    assert_eq!(producer.service, "slimci-coordinator");
    assert_eq!(producer.attributes["messaging.system"], "rabbitmq");
    // The agent's span is the producer's child: the context crossed RabbitMQ.
    let consumer = one(&spans, "the agent's attempt", |span| {
        span.kind == SPAN_KIND_CONSUMER
    });
    assert_eq!(consumer.service, "slimci-agent");
    assert_eq!(consumer.parent_span_id, producer.span_id);
    assert_eq!(consumer.attributes["cicd.worker.name"], "agent-0");
    for phase in [
        "claim",
        "checkout",
        "state_fetch",
        "profile",
        "build",
        "upload",
    ] {
        let span = one(&spans, phase, |span| span.name == phase);
        assert_eq!(span.parent_span_id, consumer.span_id, "{span:#?}");
        assert!(
            span.start_ns >= consumer.start_ns && span.end_ns <= consumer.end_ns,
            "{span:#?}"
        );
    }
    let build = one(&spans, "build", |span| span.name == "build");
    // One span per node dbt ran, inside the build, with dbt's own times.
    let node_spans: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|span| span.parent_span_id == build.span_id)
        .collect();
    let built: BTreeSet<&str> = nodes_of(&run)
        .iter()
        .map(|node| node.unique_id.as_str())
        .collect();
    assert!(!built.is_empty());
    let traced: BTreeSet<&str> = node_spans.iter().map(|span| span.name.as_str()).collect();
    assert_eq!(traced, built);
    for span in &node_spans {
        assert!(
            span.start_ns >= build.start_ns && span.end_ns <= build.end_ns,
            "{span:#?}"
        );
        assert!(span.end_ns > span.start_ns, "{span:#?}");
        assert_eq!(span.attributes["dbt.node.unique_id"], span.name);
        assert!(span.attributes.contains_key("dbt.node.status"), "{span:#?}");
    }
    let model = node_spans
        .iter()
        .find(|span| span.name == "model.shop.stg_orders")
        .expect("the edited model's span");
    assert!(
        model.attributes["dbt.node.relation"].contains("stg_orders"),
        "{model:#?}"
    );
    // No secret in any attribute.
    for span in &spans {
        for value in span.attributes.values() {
            assert!(!value.contains(slimci_tests::AGENT_TOKEN), "{span:#?}");
        }
    }
    // The metrics went out over OTLP too.
    wait_for("the coordinator's metrics", TIMEOUT, || async {
        let names = receiver.metric_names("slimci-coordinator");
        Ok((names.iter().any(|name| name == "slimci.runs_finished")
            && names.iter().any(|name| name == "slimci.queue_wait_seconds"))
        .then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(receiver.refused(), Vec::<String>::new());
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_attempt_joins_its_runs_trace() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let (toml, env) = exporting_to(&receiver);
    let mut cluster = Cluster::start(ClusterOptions {
        coordinator_toml: format!("{toml}\n[reliability]\nlease_secs = 3\n"),
        agent_toml: toml,
        agent_env: env,
        ..stub_options(2, String::new())
    })
    .await
    .unwrap();
    let record = slimci_tests::record_file();
    let sha = cluster
        .origin
        .commit_file_on_main(
            "slimci_stub.json",
            &json!({ "duration_ms": 4000, "nodes": 3, "record": record }).to_string(),
        )
        .unwrap();
    let run = cluster
        .create_run(&RunRequest {
            sha: Some(sha),
            git_ref: Some("main".to_owned()),
            ..deploy_request()
        })
        .await
        .unwrap();
    let trace_id = run.trace_id.clone().unwrap();
    cluster.wait_building(run.id, TIMEOUT).await.unwrap();
    wait_for("attempt 1's stub dbt to start", TIMEOUT, || async {
        Ok(slimci_tests::attempt_spans(&record)
            .contains_key(&run.id.to_string())
            .then_some(()))
    })
    .await
    .unwrap();
    let first_agent = cluster.run(run.id).await.unwrap().agent.unwrap();
    let victim = cluster
        .agents
        .iter()
        .position(|agent| agent.name == first_agent)
        .unwrap();
    cluster.kill_agent(victim);
    let run = cluster.wait_for_success(run.id, TIMEOUT).await.unwrap();
    assert_eq!(run.attempt, Attempt(2));

    // Attempt 1's agent was killed with its span open; attempt 2's ended.
    let spans = trace_of(&receiver, &trace_id, 1).await;
    let root = one(&spans, "the root", |span| span.parent_span_id.is_empty());
    assert_eq!(root.attributes["slimci.run.attempt"], "2");
    // Both dispatches are in the trace, one per attempt, and the lost attempt is marked.
    let producers: BTreeSet<String> = spans
        .iter()
        .filter(|span| span.kind == SPAN_KIND_PRODUCER)
        .map(|span| {
            assert_eq!(span.parent_span_id, root.span_id);
            span.attributes["slimci.run.attempt"].clone()
        })
        .collect();
    assert_eq!(producers, BTreeSet::from(["1".to_owned(), "2".to_owned()]));
    let lost = one(&spans, "the lost attempt", |span| {
        span.name == "attempt 1 lost"
    });
    assert_eq!(lost.parent_span_id, root.span_id);
    assert_eq!(lost.attributes["slimci.attempt.retried"], "true");
    // Attempt 2 waited in the queue from its retry, not from the run's request.
    let first_dispatch = one(&spans, "attempt 1's dispatch", |span| {
        span.kind == SPAN_KIND_PRODUCER && span.attributes["slimci.run.attempt"] == "1"
    });
    let queued = one(&spans, "attempt 2's wait", |span| {
        span.name == "queued (attempt 2)"
    });
    assert_eq!(queued.parent_span_id, root.span_id);
    assert!(
        queued.start_ns >= first_dispatch.end_ns && queued.start_ns <= lost.end_ns,
        "{queued:#?}\n{first_dispatch:#?}\n{lost:#?}"
    );
    // Attempt 2's agent span hangs under attempt 2's dispatch, with its nodes under its build.
    let second = one(&spans, "attempt 2's dispatch", |span| {
        span.kind == SPAN_KIND_PRODUCER && span.attributes["slimci.run.attempt"] == "2"
    });
    let consumer = one(&spans, "attempt 2 on the agent", |span| {
        span.kind == SPAN_KIND_CONSUMER && span.parent_span_id == second.span_id
    });
    assert_ne!(consumer.attributes["cicd.worker.name"], first_agent);
    let build = one(&spans, "attempt 2's build", |span| {
        span.name == "build" && span.parent_span_id == consumer.span_id
    });
    let nodes = spans
        .iter()
        .filter(|span| span.parent_span_id == build.span_id)
        .count();
    assert_eq!(nodes, 3);
    let _ = std::fs::remove_file(&record);
    cluster.restart_agent(victim).unwrap();
    cluster.assert_all_alive();
}
