//! The work that is not a build has traces too: a teardown the sweeper queued by itself (its
//! finding, the dispatch, and the agent's attempt across RabbitMQ), and a manifest published
//! from outside (its steps; and a refused one, which records no run but ends its trace in
//! error).

use std::collections::BTreeSet;

use serde_json::json;
use slimci_client::{RunStatus, RunView};
use slimci_proto::RunKind;
use slimci_tests::otlp::{
    OtlpReceiver, ReceivedSpan, SPAN_KIND_CONSUMER, SPAN_KIND_PRODUCER, SPAN_KIND_SERVER,
};
use slimci_tests::{Cluster, ClusterOptions, wait_for};

use crate::traces::{exporting_to, one, trace_of};
use crate::{TIMEOUT, stub_options, stub_pull_request};

/// OTLP's status code of a span that ended in error.
const STATUS_ERROR: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeper_teardown_and_a_published_manifest_each_are_a_trace() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let (toml, env) = exporting_to(&receiver);
    let mut cluster = Cluster::start(ClusterOptions {
        coordinator_toml: format!("{toml}\n[sweeper]\ninterval_secs = 1\nmax_age_secs = 1\n"),
        agent_toml: toml,
        agent_env: env,
        ..stub_options(1, String::new())
    })
    .await
    .unwrap();
    cluster.deploy().await.unwrap();

    // A manifest published from outside: one trace, its steps under its root.
    let sha = cluster.origin.main_sha().unwrap();
    let manifest = json!({
        "metadata": {
            "dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json",
            "dbt_version": "1.9.4"
        },
        "nodes": { "model.shop.a": {}, "model.shop.b": {} }
    })
    .to_string();
    let production = cluster
        .client
        .publish_production_state("shop", &sha, manifest.clone().into_bytes())
        .await
        .unwrap();
    assert_eq!(production.run_kind, RunKind::Publish);
    let publish = cluster.run(production.deploy_run_id).await.unwrap();
    let publish_trace = publish.trace_id.clone().expect("a publish has a trace id");
    let spans = wait_for_spans(&receiver, &publish_trace, 4).await;
    let root = one(&spans, "the publish's root", |span| {
        span.parent_span_id.is_empty()
    });
    assert_eq!(root.name, "publish run");
    assert_eq!(root.kind, SPAN_KIND_SERVER);
    assert_eq!(root.service, "slimci-coordinator");
    assert_eq!(root.attributes["cicd.pipeline.name"], "shop publish");
    assert_eq!(
        root.attributes["cicd.pipeline.run.id"],
        publish.id.to_string()
    );
    assert_eq!(root.attributes["cicd.pipeline.result"], "success");
    assert_eq!(root.attributes["vcs.ref.head.revision"], sha);
    assert_eq!(root.attributes["slimci.run.kind"], "publish");
    for step in [
        "receive manifest",
        "check manifest",
        "record production state",
    ] {
        let span = one(&spans, step, |span| span.name == step);
        assert_eq!(span.parent_span_id, root.span_id, "{span:#?}");
        assert!(
            span.start_ns >= root.start_ns && span.end_ns <= root.end_ns,
            "{span:#?} outside {root:#?}"
        );
        assert_eq!(span.attributes["cicd.pipeline.task.run.result"], "success");
    }
    let received = one(&spans, "receive", |span| span.name == "receive manifest");
    assert_eq!(
        received.attributes["slimci.manifest.sha256"],
        production.manifest_sha256
    );
    assert_eq!(
        received.attributes["slimci.manifest.bytes"],
        manifest.len().to_string()
    );
    let checked = one(&spans, "check", |span| span.name == "check manifest");
    assert_eq!(checked.attributes["slimci.manifest.nodes"], "2");

    // A refused publish records no run; its trace ends in error at the step that refused it.
    let refused = cluster
        .client
        .publish_production_state("shop", &sha, b"{\"nodes\": {}}".to_vec())
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let refused_root = wait_for("the refused publish's trace", TIMEOUT, || async {
        Ok(receiver.spans().into_iter().find(|span| {
            span.name == "publish run"
                && span.parent_span_id.is_empty()
                && span.status == STATUS_ERROR
        }))
    })
    .await
    .unwrap();
    assert_eq!(refused_root.attributes["slimci.run.status"], "refused");
    assert_eq!(refused_root.attributes["cicd.pipeline.result"], "error");
    let spans = wait_for_spans(&receiver, &refused_root.trace_id, 3).await;
    let check = one(&spans, "the refusing check", |span| {
        span.name == "check manifest"
    });
    assert_eq!(check.status, STATUS_ERROR);
    assert!(
        !spans
            .iter()
            .any(|span| span.name == "record production state"),
        "{spans:#?}"
    );
    let publishes = cluster
        .runs()
        .await
        .unwrap()
        .into_iter()
        .filter(|run| run.kind == RunKind::Publish)
        .count();
    assert_eq!(publishes, 1, "the refused publish recorded no run");

    // PR 5 is built, and never heard of again: the sweeper drops its isolation.
    let build = stub_pull_request(
        &cluster,
        5,
        r#""duration_ms": 300"#,
        r#""duration_ms": 200"#,
    );
    let build = cluster.create_run(&build).await.unwrap();
    cluster.wait_for_success(build.id, TIMEOUT).await.unwrap();
    let teardown = wait_for("the sweeper's teardown of PR 5", TIMEOUT, || async {
        Ok(cluster
            .runs()
            .await?
            .into_iter()
            .find(|run| run.kind == RunKind::Teardown && run.pr == Some(5)))
    })
    .await
    .unwrap();
    let teardown: RunView = cluster.wait_for_run(teardown.id, TIMEOUT).await.unwrap();
    assert_eq!(teardown.status, RunStatus::Success, "{teardown:?}");
    let trace_id = teardown
        .trace_id
        .clone()
        .expect("a teardown has a trace id");
    let log = cluster.log(teardown.id).await.unwrap();
    assert!(log.contains(&format!("trace {trace_id}")), "{log}");

    let spans = trace_of(&receiver, &trace_id, 1).await;
    let services: BTreeSet<&str> = spans.iter().map(|span| span.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from(["slimci-agent", "slimci-coordinator"]),
        "{spans:#?}"
    );
    let root = one(&spans, "the teardown's root", |span| {
        span.parent_span_id.is_empty()
    });
    assert_eq!(root.name, "teardown run");
    assert_eq!(root.attributes["cicd.pipeline.name"], "shop teardown");
    assert_eq!(
        root.attributes["cicd.pipeline.run.id"],
        teardown.id.to_string()
    );
    assert_eq!(root.attributes["cicd.pipeline.result"], "success");
    assert_eq!(root.attributes["vcs.change.id"], "5");
    assert_eq!(root.attributes["slimci.isolation.name"], "pr_shop_5");
    // No request made it: the sweeper's finding did, saying why.
    assert!(
        !spans.iter().any(|span| span.kind == SPAN_KIND_SERVER),
        "{spans:#?}"
    );
    let sweep = one(&spans, "the sweeper's finding", |span| {
        span.name == "sweep left-behind isolation"
    });
    assert_eq!(sweep.parent_span_id, root.span_id);
    assert_eq!(
        sweep.attributes["slimci.sweep.reason"],
        "unknown (never seen in a webhook)"
    );
    // The teardown's job crossed RabbitMQ with its trace context, like a build's.
    let producer = one(&spans, "the dispatch", |span| {
        span.kind == SPAN_KIND_PRODUCER
    });
    assert_eq!(producer.parent_span_id, root.span_id);
    let consumer = one(&spans, "the agent's attempt", |span| {
        span.kind == SPAN_KIND_CONSUMER
    });
    assert_eq!(consumer.service, "slimci-agent");
    assert_eq!(consumer.parent_span_id, producer.span_id);
    assert_eq!(consumer.attributes["slimci.run.kind"], "teardown");
    assert_eq!(consumer.attributes["slimci.isolation.name"], "pr_shop_5");
    assert_eq!(
        consumer.attributes["cicd.pipeline.task.run.result"],
        "success"
    );
    for step in ["claim", "checkout"] {
        let span = one(&spans, step, |span| span.name == step);
        assert_eq!(span.parent_span_id, consumer.span_id, "{span:#?}");
    }

    // The publish's root was exported once, by its request, never again at its run's end.
    let roots = receiver
        .spans()
        .into_iter()
        .filter(|span| span.trace_id == publish_trace && span.parent_span_id.is_empty())
        .count();
    assert_eq!(roots, 1);
    assert_eq!(receiver.refused(), Vec::<String>::new());
    cluster.assert_all_alive();
}

/// Every span of trace `trace_id`, once at least `count` arrived.
async fn wait_for_spans(
    receiver: &OtlpReceiver,
    trace_id: &str,
    count: usize,
) -> Vec<ReceivedSpan> {
    wait_for("the trace's spans", TIMEOUT, || async {
        let spans: Vec<ReceivedSpan> = receiver
            .spans()
            .into_iter()
            .filter(|span| span.trace_id == trace_id)
            .collect();
        Ok((spans.len() >= count).then_some(spans))
    })
    .await
    .unwrap()
}
