//! Nothing lost, nothing built twice: agents killed mid-build, builds longer than the broker's
//! consumer timeout, poison jobs, graceful and forced shutdown, broker and coordinator restarts,
//! hostile volumes. Real binaries, a RabbitMQ node of the test's own where the broker is
//! restarted, and the stub dbt (tests/src/bin/slimci-stub-dbt.rs) for timing.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use slimci_client::{RunRequest, RunStatus, RunView};
use slimci_proto::{Attempt, RunId};
use slimci_tests::broker::PrivateBroker;
use slimci_tests::measure::process_gone;
use slimci_tests::storm::{StormConfig, storm};
use slimci_tests::{Cluster, ClusterOptions, binary, deploy_request, wait_for, workspace_root};

const TIMEOUT: Duration = Duration::from_secs(120);

fn stub_options(agents: usize, coordinator_toml: &str) -> ClusterOptions {
    ClusterOptions {
        agents,
        slots: 1,
        dbt: Some(binary("slimci-stub-dbt")),
        project: Some(workspace_root().join("tests/fixtures/stub")),
        coordinator_toml: coordinator_toml.to_owned(),
        ..Default::default()
    }
}

/// Makes main's stub build behave as `stub` and deploys it; returns the run id (not waited on).
async fn deploy_with(cluster: &Cluster, stub: Value) -> RunId {
    let sha = cluster
        .origin
        .commit_file_on_main("slimci_stub.json", &stub.to_string())
        .unwrap();
    let request = RunRequest {
        sha: Some(sha),
        git_ref: Some("main".to_owned()),
        ..deploy_request()
    };
    cluster.create_run(&request).await.unwrap().id
}

/// The name of the agent that took the run.
fn agent_of(run: &RunView) -> &str {
    run.agent
        .as_deref()
        .unwrap_or_else(|| panic!("no agent in {run:?}"))
}

fn agent_index(cluster: &Cluster, name: &str) -> usize {
    cluster
        .agents
        .iter()
        .position(|agent| agent.name == name)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_build_is_retried_elsewhere_without_overlap() {
    let mut cluster = Cluster::start(stub_options(2, "[reliability]\nlease_secs = 3\n"))
        .await
        .unwrap();
    let record = slimci_tests::record_file();
    let id = deploy_with(&cluster, json!({ "duration_ms": 4000, "record": record })).await;
    let running = cluster.wait_building(id, TIMEOUT).await.unwrap();
    // The build phase has begun, but the stub dbt may not have started yet: kill the agent only
    // once attempt 1 has left a sign of life, so there is a build to overlap with.
    wait_for("attempt 1's stub dbt to start", TIMEOUT, || async {
        Ok(slimci_tests::attempt_spans(&record)
            .contains_key(&id.to_string())
            .then_some(()))
    })
    .await
    .unwrap();
    let victim = agent_index(&cluster, agent_of(&running));
    cluster.kill_agent(victim);
    let run = cluster.wait_for_run(id, TIMEOUT).await.unwrap();
    assert_eq!(run.status, RunStatus::Success, "{run:?}");
    assert_eq!(run.attempt, Attempt(2), "retried once");
    assert_ne!(run.agent, running.agent, "on the other agent");
    // The stub's records: attempt 1's last sign of life came before attempt 2 started.
    let spans = slimci_tests::attempt_spans(&record);
    let spans = spans.get(&id.to_string()).expect("records of the run");
    assert_eq!(spans.len(), 2, "{spans:?}");
    let (first, second) = if spans[0].0 < spans[1].0 {
        (spans[0], spans[1])
    } else {
        (spans[1], spans[0])
    };
    assert!(first.1 < second.0, "attempts overlapped: {spans:?}");
    let log = cluster.log(id).await.unwrap();
    assert!(log.contains("[slimci] attempt 2"), "{log}");
    cluster.restart_agent(victim).unwrap();
    let _ = std::fs::remove_file(&record);
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_longer_than_the_consumer_timeout_completes_once() {
    // The broker closes any channel holding an unacknowledged delivery for more than 2 s.
    let broker = PrivateBroker::start(2000).await.unwrap();
    let mut cluster = Cluster::start(ClusterOptions {
        amqp_url: Some(broker.url()),
        ..stub_options(1, "")
    })
    .await
    .unwrap();
    let record = slimci_tests::record_file();
    let id = deploy_with(&cluster, json!({ "duration_ms": 7000, "record": record })).await;
    let run = cluster.wait_for_run(id, TIMEOUT).await.unwrap();
    assert_eq!(run.status, RunStatus::Success, "{run:?}");
    assert_eq!(run.attempt, Attempt(1));
    let spans = slimci_tests::attempt_spans(&record);
    let id = id.to_string();
    assert_eq!(spans[&id].len(), 1, "built once: {spans:?}");
    assert!(
        spans[&id][0].1 - spans[&id][0].0 >= 6000,
        "and the build really outlasted the timeout"
    );
    assert_eq!(cluster.queue_depth("jobs").await.unwrap(), 0);
    let _ = std::fs::remove_file(&record);
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_job_is_dead_lettered_after_max_attempts() {
    let mut cluster = Cluster::start(stub_options(
        2,
        "[reliability]\nlease_secs = 2\nmax_attempts = 2\n",
    ))
    .await
    .unwrap();
    let id = deploy_with(&cluster, json!({ "duration_ms": 60000 })).await;
    // Whatever agent takes it dies, twice.
    for attempt in 1..=2 {
        let running = wait_for("an attempt to build", TIMEOUT, || async {
            let run = cluster.run(id).await?;
            Ok(
                (run.status == RunStatus::Running && run.attempt == Attempt(attempt))
                    .then_some(run),
            )
        })
        .await
        .unwrap();
        let victim = agent_index(&cluster, agent_of(&running));
        cluster.kill_agent(victim);
        cluster.restart_agent(victim).unwrap();
    }
    let run = cluster.wait_for_run(id, TIMEOUT).await.unwrap();
    assert_eq!(run.status, RunStatus::Error);
    assert!(
        run.message
            .as_deref()
            .unwrap()
            .contains("gave up after 2 attempts"),
        "{run:?}"
    );
    wait_for(
        "the poison job in the dead-letter queue",
        TIMEOUT,
        || async { Ok((cluster.queue_depth("jobs.dead").await? == 1).then_some(())) },
    )
    .await
    .unwrap();
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_and_forced_shutdown_hands_over() {
    let mut cluster = Cluster::start(stub_options(1, "[reliability]\nlease_secs = 3\n"))
        .await
        .unwrap();
    // Graceful: one SIGTERM, the running build finishes, the agent exits by itself.
    let id = deploy_with(&cluster, json!({ "duration_ms": 3000 })).await;
    cluster.wait_building(id, TIMEOUT).await.unwrap();
    cluster.agents[0].signal(Signal::SIGTERM);
    let run = cluster.wait_for_run(id, TIMEOUT).await.unwrap();
    assert_eq!(
        (run.status, run.attempt),
        (RunStatus::Success, Attempt(1)),
        "{run:?}"
    );
    let pid = cluster.agents[0].pid();
    wait_for("the agent to exit", TIMEOUT, || async {
        Ok(process_gone(pid).then_some(()))
    })
    .await
    .unwrap();
    assert!(cluster.agents[0].exited(), "the agent exited by itself");
    cluster.agents.clear();

    // Forced: two SIGTERMs, the build is released and another agent finishes it.
    cluster.start_agent("leaving", 1).unwrap();
    let id = deploy_with(&cluster, json!({ "duration_ms": 3000, "log_lines": 7 })).await;
    cluster.wait_building(id, TIMEOUT).await.unwrap();
    cluster.start_agent("staying", 1).unwrap();
    cluster.agents[0].signal(Signal::SIGTERM);
    let leaving_log = cluster.agents[0].log.clone();
    // Two signals in a row would arrive as one: send the second once the first took effect.
    wait_for("the agent to start draining", TIMEOUT, || async {
        Ok(std::fs::read_to_string(&leaving_log)?
            .contains("draining")
            .then_some(()))
    })
    .await
    .unwrap();
    cluster.agents[0].signal(Signal::SIGTERM);
    let run = cluster.wait_for_run(id, TIMEOUT).await.unwrap();
    assert_eq!(run.status, RunStatus::Success, "{run:?}");
    assert_eq!(run.attempt, Attempt(2));
    assert_eq!(run.agent.as_deref(), Some("staying"));
    let leaving = std::fs::read_to_string(&cluster.agents[0].log).unwrap();
    assert!(leaving.contains("released the attempt"), "{leaving}");
    cluster.agents.remove(0);
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_survive_a_broker_restart_mid_queue_and_a_coordinator_restart_mid_build() {
    let mut broker = PrivateBroker::start(1_800_000).await.unwrap();
    let mut cluster = Cluster::start(ClusterOptions {
        amqp_url: Some(broker.url()),
        ..stub_options(1, "[reliability]\nlease_secs = 20\n")
    })
    .await
    .unwrap();
    let first = deploy_with(&cluster, json!({ "duration_ms": 3000, "log_lines": 50 })).await;
    let second = deploy_with(&cluster, json!({ "duration_ms": 500, "log_lines": 50 })).await;
    cluster.wait_building(first, TIMEOUT).await.unwrap();
    broker.restart().await.unwrap();
    cluster.restart_coordinator().await.unwrap();
    for id in [first, second] {
        let run = cluster.wait_for_run(id, TIMEOUT).await.unwrap();
        assert_eq!(
            (run.status, run.attempt),
            (RunStatus::Success, Attempt(1)),
            "{run:?}"
        );
        let log = cluster.log(id).await.unwrap();
        assert_eq!(
            log.matches("stub log line").count(),
            50,
            "every log line arrived once:\n{log}"
        );
    }
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_takes_no_jobs_until_the_coordinator_answers() {
    let mut cluster = Cluster::start(stub_options(0, "")).await.unwrap();
    let id = deploy_with(&cluster, json!({ "duration_ms": 0 })).await;
    wait_for("the deploy's job on the queue", TIMEOUT, || async {
        Ok((cluster.queue_depth("jobs").await? == 1).then_some(()))
    })
    .await
    .unwrap();
    cluster.stop_coordinator();
    cluster.start_agent("agent-0", 1).unwrap();
    let log = cluster.agents[0].log.clone();
    // Two failed tries, so the agent is retrying rather than just started.
    wait_for(
        "the agent to say twice that it cannot reach the coordinator",
        TIMEOUT,
        || {
            let log = log.clone();
            async move {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tries = text
                    .matches("cannot reach the coordinator; taking no jobs until it answers")
                    .count();
                Ok((tries >= 2).then_some(()))
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (
            cluster.queue_depth("jobs").await.unwrap(),
            cluster.queue_consumers("jobs").await.unwrap()
        ),
        (1, 0),
        "the job waits in the queue, and the agent does not consume"
    );
    cluster.agents[0].assert_alive();

    cluster.start_coordinator_again().await.unwrap();
    let run = cluster.wait_for_run(id, TIMEOUT).await.unwrap();
    assert_eq!(
        (run.status, run.attempt, run.agent.as_deref()),
        (RunStatus::Success, Attempt(1), Some("agent-0")),
        "{run:?}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the coordinator answers now"), "{text}");
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_volumes_are_cut_not_crashed() {
    let mut cluster = Cluster::start(ClusterOptions {
        coordinator_toml: "[limits]\nmax_log_bytes = 1048576\n".to_owned(),
        ..stub_options(1, "")
    })
    .await
    .unwrap();
    // A 10 MB line, invalid UTF-8, and 100 MB of log (the long variant prints 1 GB).
    let id = deploy_with(&cluster, json!({ "duration_ms": 0, "line_bytes": 10_000_000, "invalid_utf8": true, "log_bytes": 100_000_000u64 })).await;
    let run = cluster
        .wait_for_run(id, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Success, "{run:?}");
    let log = cluster.log(id).await.unwrap();
    assert!(
        log.len() <= 1_100_000,
        "the stored log is capped: {} bytes",
        log.len()
    );
    assert!(
        log.trim_end().ends_with(
            "[slimci] log truncated: this run printed more than the configured log limit"
        )
    );
    assert!(
        log.contains("more bytes of this line dropped"),
        "the 10 MB line was cut"
    );
    assert!(
        log.contains("invalid \u{fffd}\u{fffd} utf-8"),
        "invalid UTF-8 was replaced"
    );
    // Oversized and malformed API bodies: raw HTTP on purpose.
    let response = cluster
        .http
        .post(format!("{}/api/v1/runs", cluster.url))
        .body(vec![b'{'; 70_000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let response = cluster
        .http
        .post(format!("{}/api/v1/agent/heartbeat", cluster.url))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_fault_storm_loses_nothing_and_never_overlaps() {
    let report = storm(StormConfig {
        runs: 24,
        agents: 3,
        slots: 2,
        build_ms: 2000,
        kill_every: Duration::from_secs(3),
        deadline: Duration::from_secs(400),
    })
    .await
    .unwrap();
    report.print();
    assert_eq!(report.terminal, report.runs);
    assert_eq!(report.lost, 0);
    assert_eq!(report.overlapping, 0);
    assert!(report.kills >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_build_gets_sigterm_and_ends_well_within_the_grace_period() {
    // The harness gives builds `grace_secs = 5`: a build that never saw SIGTERM would only end
    // by the SIGKILL after it.
    let mut cluster = Cluster::start(stub_options(1, "")).await.unwrap();
    let record = slimci_tests::record_file();
    let id = deploy_with(&cluster, json!({ "duration_ms": 60000, "record": record })).await;
    cluster.wait_building(id, TIMEOUT).await.unwrap();
    // The stub records `start` once its SIGTERM handler is in place.
    wait_for("the stub dbt to start", TIMEOUT, || async {
        let records = std::fs::read_to_string(&record).unwrap_or_default();
        Ok(records
            .lines()
            .any(|line| line.contains("\"event\":\"start\""))
            .then_some(()))
    })
    .await
    .unwrap();
    let asked = std::time::Instant::now();
    cluster.client.cancel(id).await.unwrap();
    let run = cluster.wait_for_run(id, TIMEOUT).await.unwrap();
    let took = asked.elapsed();
    assert_eq!(run.status, RunStatus::Cancelled, "{run:?}");
    assert!(took < Duration::from_secs(3), "cancel took {took:?}");
    // The stub records `end` only from its SIGTERM handler (or a normal end, 60 s away).
    let records = std::fs::read_to_string(&record).unwrap();
    assert!(
        records
            .lines()
            .any(|line| line.contains("\"event\":\"end\"")),
        "dbt never saw SIGTERM: {records}"
    );
    let _ = std::fs::remove_file(&record);
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_least_privilege_broker_users_an_agent_checks_the_topology_and_serves() {
    use lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicPublishOptions};
    let broker = PrivateBroker::start(1_800_000).await.unwrap();
    // The permissions ansible's `slimci_coordinator` role gives its two users (its
    // vars/main.yml), written here for any test cluster's prefix rather than for one.
    let prefix = r"slimci-test-[0-9a-f]{32}";
    broker
        .add_user(
            "coordinator",
            "coordinator-password",
            [
                &format!(r"^{prefix}\..*$"),
                &format!(r"^({prefix}\..*|amq\.default)$"),
                &format!(r"^{prefix}\..*$"),
            ],
        )
        .unwrap();
    broker
        .add_user(
            "agent",
            "agent-password",
            [
                r"^amq\.gen-.*$",
                &format!(r"^(amq\.gen-.*|amq\.default|{prefix}\.dead-letter)$"),
                &format!(r"^(amq\.gen-.*|{prefix}\.jobs|{prefix}\.control)$"),
            ],
        )
        .unwrap();
    let agent_url = broker.url_of("agent", "agent-password");

    // Before any coordinator has run on the broker, the agent's user may not declare slimci's
    // names and finds none: the error says what to do.
    let topology =
        slimci_proto::Topology::new(&format!("slimci-test-{}", uuid::Uuid::new_v4().simple()));
    let as_agent = lapin::Connection::connect(&agent_url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let error = slimci_broker::declare_topology(&as_agent, &topology)
        .await
        .unwrap_err();
    assert!(
        matches!(error, slimci_broker::BrokerError::TopologyMissing { .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("start the coordinator"),
        "{error}"
    );

    let mut cluster = Cluster::start(ClusterOptions {
        amqp_url: Some(broker.url()),
        coordinator_amqp_url: Some(broker.url_of("coordinator", "coordinator-password")),
        agent_amqp_url: Some(agent_url),
        ..stub_options(1, "")
    })
    .await
    .unwrap();
    // Jobs reach the agent and its events reach the coordinator.
    let id = deploy_with(&cluster, json!({ "duration_ms": 100 })).await;
    let run = cluster.wait_for_run(id, TIMEOUT).await.unwrap();
    assert_eq!(run.status, RunStatus::Success, "{run:?}");
    // A cancel reaches it through the control exchange.
    let id = deploy_with(&cluster, json!({ "duration_ms": 60000 })).await;
    cluster.wait_building(id, TIMEOUT).await.unwrap();
    cluster.client.cancel(id).await.unwrap();
    let run = cluster.wait_for_run(id, TIMEOUT).await.unwrap();
    assert_eq!(run.status, RunStatus::Cancelled, "{run:?}");
    // A job it cannot read goes to the dead-letter queue with the agent's reason, which it may
    // publish to `<prefix>.dead-letter` (a refused copy would arrive without one).
    let inspector =
        lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = inspector.create_channel().await.unwrap();
    channel
        .basic_publish(
            "".into(),
            format!("{}.jobs", cluster.prefix).as_str().into(),
            BasicPublishOptions::default(),
            b"not json",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_for("the garbage to be dead-lettered", TIMEOUT, || async {
        Ok((cluster.queue_depth("jobs.dead").await? == 1).then_some(()))
    })
    .await
    .unwrap();
    let dead = channel
        .basic_get(
            format!("{}.jobs.dead", cluster.prefix).as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .unwrap();
    let reason = slimci_broker::dead_reason(&dead.delivery.properties);
    assert!(
        reason.as_deref().is_some_and(|r| r.contains("is not JSON")),
        "{reason:?}"
    );
    // And the agent's user may not read what is not its own: the events.
    let channel = as_agent.create_channel().await.unwrap();
    let refused = channel
        .basic_consume(
            format!("{}.events", cluster.prefix).as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|error| error.to_string().contains("ACCESS_REFUSED")),
        "{:?}",
        refused.map(|_| ())
    );
    let _ = inspector.close(200, "bye".into()).await;
    cluster.assert_all_alive();
}
