//! What an operator sees of the fleet: `/metrics` scraped and parsed and checked against what
//! the test did, the agents registry (`GET /api/v1/agents`, `slimci agents`), and the traces
//! of runs received by an OTLP/HTTP receiver inside the test (`slimci_tests::otlp`), decoded
//! with `opentelemetry-proto`: one trace per run across coordinator, RabbitMQ and agent, with
//! a span per dbt node, and a retried attempt in the same trace.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::json;
use slimci_client::{RunRequest, RunStatus};
use slimci_proto::{Attempt, RunId};
use slimci_tests::otlp::{
    OtlpReceiver, ReceivedSpan, SPAN_KIND_CONSUMER, SPAN_KIND_PRODUCER, SPAN_KIND_SERVER,
};
use slimci_tests::{
    Cluster, ClusterOptions, binary, ci_request, deploy_request, edits, free_port, nodes_of,
    wait_for, workspace_root,
};

const TIMEOUT: Duration = Duration::from_secs(120);

/// One scrape: every sample by its name and labels (`name{a="1",b="2"}`, labels in the order
/// they came), and the families that had `# HELP` and `# TYPE`.
struct Scrape {
    samples: BTreeMap<String, f64>,
    typed: BTreeSet<String>,
    helped: BTreeSet<String>,
}

impl Scrape {
    /// Parses Prometheus text; fails on any line that is neither a comment nor a sample.
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape {
            samples: BTreeMap::new(),
            typed: BTreeSet::new(),
            helped: BTreeSet::new(),
        };
        for line in text.lines().filter(|line| !line.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                scrape.typed.insert(name.to_owned());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP has a text");
                assert!(!help.is_empty(), "{line}");
                scrape.helped.insert(name.to_owned());
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {line}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                value => value
                    .parse()
                    .unwrap_or_else(|_| panic!("not a number: {line}")),
            };
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name: {line}"
            );
            assert!(
                scrape.samples.insert(series.to_owned(), value).is_none(),
                "sample twice: {line}"
            );
        }
        for series in scrape.samples.keys() {
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|family| scrape.typed.contains(*family))
                })
                .unwrap_or(name);
            assert!(
                scrape.typed.contains(family) && scrape.helped.contains(family),
                "{series} has no TYPE or HELP"
            );
        }
        scrape
    }

    /// The value of one series; fails when it is missing (idle series are there at 0).
    fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in {:#?}", self.samples.keys()))
    }
}

async fn scrape(cluster: &Cluster, url: &str) -> Scrape {
    let response = cluster
        .http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    Scrape::parse(&response.text().await.unwrap())
}

fn stub_options(agents: usize, coordinator_toml: String) -> ClusterOptions {
    ClusterOptions {
        agents,
        slots: 1,
        dbt: Some(binary("slimci-stub-dbt")),
        project: Some(workspace_root().join("tests/fixtures/stub")),
        coordinator_toml,
        ..Default::default()
    }
}

/// A pull request whose stub build behaves as `from` → `to` in `slimci_stub.json` says.
fn stub_pull_request(cluster: &Cluster, pr: u64, from: &str, to: &str) -> RunRequest {
    let sha = cluster
        .origin
        .pull_request(pr, &[("slimci_stub.json", from, to)])
        .unwrap();
    ci_request(pr, &sha)
}

async fn wait_building(cluster: &Cluster, id: RunId) {
    wait_for("the run to be building", TIMEOUT, || async {
        let run = cluster.run(id).await?;
        let building = run.status == RunStatus::Running
            && run
                .phases
                .as_ref()
                .is_some_and(|phases| phases.iter().any(|phase| phase.phase == "build"));
        Ok(building.then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_the_fleet_view_count_what_happened() {
    let metrics_port = free_port().unwrap();
    let mut cluster = Cluster::start(stub_options(
        2,
        format!("[telemetry]\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n"),
    ))
    .await
    .unwrap();

    // Before anything ran, every series is there at 0.
    let idle = scrape(&cluster, &cluster.url).await;
    assert_eq!(
        idle.value(r#"slimci_runs_finished_total{kind="ci",result="failed"}"#),
        0.0
    );
    assert_eq!(
        idle.value(r#"slimci_queue_runs_waiting{repository="shop"}"#),
        0.0
    );
    assert_eq!(
        idle.value(r#"slimci_webhook_deliveries_total{outcome="forged"}"#),
        0.0
    );
    assert_eq!(
        idle.value(r#"slimci_queue_wait_seconds_count{kind="ci"}"#),
        0.0
    );

    // Three runs: a deploy that succeeds, a PR build that fails, a PR build still building.
    cluster.deploy().await.unwrap();
    let failing = stub_pull_request(&cluster, 1, r#""exit_code": 0"#, r#""exit_code": 1"#);
    let failing = cluster.create_run(&failing).await.unwrap();
    let failed = cluster.wait_for_run(failing.id, TIMEOUT).await.unwrap();
    assert_eq!(failed.status, RunStatus::Failed, "{failed:?}");
    let long = stub_pull_request(
        &cluster,
        2,
        r#""duration_ms": 300"#,
        r#""duration_ms": 120000"#,
    );
    let long = cluster.create_run(&long).await.unwrap();
    wait_building(&cluster, long.id).await;

    // The fleet: both agents known (the idle one by its registration heartbeat), one busy
    // with the long run.
    let agents = wait_for("both agents in the fleet view", TIMEOUT, || async {
        let agents = cluster.client.agents().await?;
        let settled = agents.len() == 2
            && agents.iter().all(|agent| agent.slots == Some(1))
            && agents.iter().filter(|agent| agent.state == "busy").count() == 1
            && agents.iter().filter(|agent| agent.state == "idle").count() == 1;
        Ok(settled.then_some(agents))
    })
    .await
    .unwrap();
    let busy = agents.iter().find(|agent| agent.state == "busy").unwrap();
    assert_eq!(busy.current_runs, vec![long.id]);
    assert_eq!(busy.busy_slots, 1);
    assert_eq!(busy.version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    let idle_agent = agents.iter().find(|agent| agent.state == "idle").unwrap();
    assert!(idle_agent.current_runs.is_empty(), "{idle_agent:?}");
    let cli = cluster.run_cli(&["agents"]).await;
    let table = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{table}");
    for agent in &agents {
        assert!(table.contains(&agent.name), "{table}");
    }
    assert!(
        table.contains("busy") && table.contains(&long.id.to_string()),
        "{table}"
    );

    let scraped = scrape(&cluster, &cluster.url).await;
    let value = |series: &str| scraped.value(series);
    assert_eq!(
        value(r#"slimci_runs_finished_total{kind="deploy",result="success"}"#),
        1.0
    );
    assert_eq!(
        value(r#"slimci_runs_finished_total{kind="ci",result="failed"}"#),
        1.0
    );
    assert_eq!(
        value(r#"slimci_runs_finished_total{kind="ci",result="success"}"#),
        0.0
    );
    assert_eq!(value(r#"slimci_runs_running{kind="ci"}"#), 1.0);
    assert_eq!(value(r#"slimci_agents{state="busy"}"#), 1.0);
    assert_eq!(value(r#"slimci_agents{state="idle"}"#), 1.0);
    assert_eq!(value(r#"slimci_agents{state="offline"}"#), 0.0);
    assert_eq!(value("slimci_slots"), 2.0);
    assert_eq!(value("slimci_slots_busy"), 1.0);
    assert_eq!(value("slimci_fleet_saturation"), 0.5);
    assert_eq!(
        value(r#"slimci_queue_runs_waiting{repository="shop"}"#),
        0.0
    );
    assert_eq!(
        value(r#"slimci_queue_oldest_wait_seconds{repository="shop"}"#),
        0.0
    );
    // Each run's first attempt was claimed once; two built runs ended.
    assert_eq!(
        value(r#"slimci_queue_wait_seconds_count{kind="deploy"}"#),
        1.0
    );
    assert_eq!(value(r#"slimci_queue_wait_seconds_count{kind="ci"}"#), 2.0);
    assert_eq!(
        value(r#"slimci_queue_wait_seconds_bucket{kind="ci",le="+Inf"}"#),
        2.0
    );
    assert_eq!(
        value(r#"slimci_run_duration_seconds_count{kind="deploy"}"#),
        1.0
    );
    assert_eq!(
        value(r#"slimci_run_duration_seconds_count{kind="ci"}"#),
        1.0
    );
    // The stub builds 3 models; the failing build's first one errors.
    assert_eq!(
        value(r#"slimci_dbt_nodes_per_run_sum{outcome="built"}"#),
        5.0
    );
    assert_eq!(
        value(r#"slimci_dbt_nodes_per_run_sum{outcome="failed"}"#),
        1.0
    );
    assert_eq!(
        value(r#"slimci_dbt_nodes_per_run_count{outcome="built"}"#),
        2.0
    );
    // Every run got past its checkout; the agents reported each phase's duration.
    assert_eq!(
        value(r#"slimci_phase_duration_seconds_count{phase="checkout"}"#),
        3.0
    );
    assert_eq!(
        value(r#"slimci_phase_duration_seconds_count{phase="build"}"#),
        2.0
    );
    let busy_seconds: f64 = agents
        .iter()
        .map(|agent| {
            scraped
                .samples
                .get(&format!(
                    r#"slimci_agent_slot_busy_seconds_total{{agent="{}"}}"#,
                    agent.name
                ))
                .copied()
                .unwrap_or(0.0)
        })
        .sum();
    assert!(
        busy_seconds > 0.0,
        "the agents' slot time reached the coordinator"
    );
    assert_eq!(
        value(r#"slimci_cache_lookups_total{cache="git",result="fetched"}"#)
            + value(r#"slimci_cache_lookups_total{cache="git",result="hit"}"#),
        2.0
    );

    // The same numbers, without a token, on the metrics listener.
    let open = scrape(&cluster, &format!("http://127.0.0.1:{metrics_port}")).await;
    assert_eq!(
        open.value(r#"slimci_runs_finished_total{kind="ci",result="failed"}"#),
        1.0
    );
    assert_eq!(open.value("slimci_slots_busy"), 1.0);

    // Cancelling the long run frees the fleet.
    cluster.client.cancel(long.id).await.unwrap();
    let cancelled = cluster.wait_for_run(long.id, TIMEOUT).await.unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    let after = wait_for("the fleet to be idle", TIMEOUT, || async {
        let scraped = scrape(&cluster, &cluster.url).await;
        Ok((scraped.value("slimci_slots_busy") == 0.0).then_some(scraped))
    })
    .await
    .unwrap();
    assert_eq!(after.value("slimci_cancels_total"), 1.0);
    assert_eq!(
        after.value(r#"slimci_runs_finished_total{kind="ci",result="cancelled"}"#),
        1.0
    );
    assert_eq!(after.value(r#"slimci_agents{state="idle"}"#), 2.0);
    assert_eq!(after.value("slimci_fleet_saturation"), 0.0);
    cluster.assert_all_alive();
}

/// `[telemetry]` exporting to the test's receiver; spans leave the agents within 200 ms.
fn exporting_to(receiver: &OtlpReceiver) -> (String, Vec<(String, String)>) {
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
async fn trace_of(receiver: &OtlpReceiver, trace_id: &str, consumers: usize) -> Vec<ReceivedSpan> {
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

fn one<'a>(
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
    let mut cluster = Cluster::start(ClusterOptions {
        coordinator_toml: toml.clone(),
        agent_toml: toml,
        agent_env: env,
        ..Default::default()
    })
    .await
    .unwrap();
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

    let spans = trace_of(&receiver, &trace_id, 1).await;
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
    wait_building(&cluster, run.id).await;
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
