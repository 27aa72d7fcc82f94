//! The core pipeline end to end: real coordinator and agent binaries, real RabbitMQ, real dbt
//! with DuckDB, a real git repository.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use slimci_client::{ClientError, Progress, RunRequest, RunStatus, RunView};
use slimci_proto::{NodeResult, RunId};
use slimci_tests::measure::ms_of;
use slimci_tests::{
    Cluster, ClusterOptions, ci_request, deploy_request, dump_database, edits, nodes_of, phases_of,
    wait_for,
};

const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// What `state:modified+` selects when stg_orders changes (examples/shop/README.md).
const STG_ORDERS_AND_DESCENDANT_MODELS: [&str; 6] = [
    "model.shop.stg_orders",
    "model.shop.int_customer_payments",
    "model.shop.fct_orders",
    "model.shop.dim_customers",
    "model.shop.customer_lifetime_value",
    "model.shop.daily_revenue",
];
const SELECTED_TESTS: usize = 15;

fn ids(run: &RunView, resource_type: &str) -> BTreeSet<String> {
    nodes_of(run)
        .iter()
        .filter(|node| node.resource_type == resource_type)
        .map(|node| node.unique_id.clone())
        .collect()
}

fn run_id_from_cli(stderr: &str) -> RunId {
    let line = stderr
        .lines()
        .find(|line| line.starts_with("slimci: run "))
        .unwrap_or_else(|| panic!("no run id in: {stderr}"));
    RunId::parse(line.split_whitespace().nth(2).unwrap()).unwrap()
}

/// The HTTP status the coordinator refused a call with.
fn refusal<T: std::fmt::Debug>(result: Result<T, ClientError>) -> Option<StatusCode> {
    result.expect_err("the call was refused").status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pr_builds_only_what_it_changed_deferring_the_rest_to_production() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    let deploy = cluster.deploy().await.unwrap();
    let deploy_id = deploy.id;
    assert_eq!(deploy.sha, Some(cluster.origin.main_sha().unwrap()));
    let state = cluster.production_state().await.unwrap();
    assert_eq!(state.deploy_run_id, deploy_id);
    let production_before = dump_database(&cluster.production_database(), None).unwrap();
    assert!(
        production_before.get("main.stg_customers").is_some(),
        "{production_before}"
    );

    let sha = cluster
        .origin
        .pull_request(1, &[edits::ADD_COLUMN])
        .unwrap();
    let output = cluster
        .run_cli(&["trigger", "--repo", "shop", "--pr", "1", "--sha", &sha])
        .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("1 of 21 START"),
        "the CLI streams dbt's log live:\n{stdout}"
    );
    assert!(stdout.contains(": success in"), "{stdout}");

    let run = cluster.run(run_id_from_cli(&stderr)).await.unwrap();
    assert_eq!(run.status, RunStatus::Success);
    assert_eq!(run.sha.as_deref(), Some(sha.as_str()));
    assert_eq!(run.isolation.as_deref(), Some("pr_shop_1"));
    assert_eq!(
        run.production_state
            .as_ref()
            .map(|state| state.deploy_run_id),
        Some(deploy_id),
        "the run records what it compared against"
    );
    assert_eq!(run.dbt_exit_code, Some(0));
    let expected: BTreeSet<String> = STG_ORDERS_AND_DESCENDANT_MODELS
        .iter()
        .map(|id| id.to_string())
        .collect();
    assert_eq!(
        ids(&run, "model"),
        expected,
        "exactly the modified model and its descendants"
    );
    assert_eq!(ids(&run, "test").len(), SELECTED_TESTS);
    assert!(
        ids(&run, "seed").is_empty(),
        "unmodified seeds are deferred, not built"
    );
    let summary = run.summary.as_ref().unwrap();
    assert_eq!(summary.built, 6);
    assert_eq!(summary.tests_passed as usize, SELECTED_TESTS);
    let names: Vec<&str> = phases_of(&run)
        .iter()
        .map(|phase| phase.phase.as_str())
        .collect();
    assert_eq!(
        names,
        ["checkout", "state_fetch", "profile", "build", "upload"]
    );
    assert!(
        phases_of(&run)
            .iter()
            .all(|phase| phase.ok == Some(true) && phase.duration_s.is_some())
    );
    assert_eq!(
        run.progress,
        Progress {
            done: 21,
            total: 21
        }
    );
    let artifacts: Vec<&str> = run
        .artifacts
        .as_deref()
        .unwrap()
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(artifacts, ["manifest.json", "run_results.json"]);

    // The PR's database holds exactly the selected models; their unselected parents are read
    // from production through the read-only attachment.
    let pr = dump_database(
        &cluster.pr_database(1),
        Some(&cluster.production_database()),
    )
    .unwrap();
    let relations: BTreeSet<String> = pr.as_object().unwrap().keys().cloned().collect();
    let expected_relations: BTreeSet<String> = STG_ORDERS_AND_DESCENDANT_MODELS
        .iter()
        .map(|id| format!("main.{}", id.rsplit('.').next().unwrap()))
        .collect();
    assert_eq!(relations, expected_relations);
    assert!(
        pr["main.stg_orders"]["columns"]
            .as_array()
            .unwrap()
            .contains(&json!("order_day_of_week"))
    );
    assert_eq!(
        pr["main.fct_orders"]["rows"],
        production_before["main.fct_orders"]["rows"]
    );

    // Production is exactly as it was.
    let production_after = dump_database(&cluster.production_database(), None).unwrap();
    assert_eq!(production_after, production_before);

    let log = cluster.log(run.id).await.unwrap();
    assert!(
        log.contains(&format!(
            "comparing against production state of deploy {deploy_id}"
        )),
        "{log}"
    );
    assert!(log.contains("Done. PASS=21"), "{log}");
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pr_that_fails_a_test_fails_and_names_the_test() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    cluster.deploy().await.unwrap();
    let sha = cluster.origin.pull_request(2, &[edits::FAIL_TEST]).unwrap();
    let output = cluster
        .run_cli(&["trigger", "--repo", "shop", "--pr", "2", "--sha", &sha])
        .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("FAIL test.shop.accepted_values_stg_orders_status"),
        "the summary names the failing test:\n{stdout}"
    );

    let run = cluster
        .run(run_id_from_cli(&String::from_utf8_lossy(&output.stderr)))
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.dbt_exit_code, Some(1));
    let failing: Vec<&NodeResult> = nodes_of(&run)
        .iter()
        .filter(|node| node.status == "fail")
        .collect();
    assert_eq!(failing.len(), 1);
    assert!(
        failing[0]
            .unique_id
            .starts_with("test.shop.accepted_values_stg_orders_status")
    );
    assert_eq!(failing[0].failures, Some(5));
    assert!(
        run.message
            .as_deref()
            .unwrap()
            .contains("accepted_values_stg_orders_status"),
        "{:?}",
        run.message
    );
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pr_with_invalid_sql_fails_with_dbts_error_in_the_log() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    cluster.deploy().await.unwrap();
    let sha = cluster.origin.pull_request(3, &[edits::BAD_SQL]).unwrap();
    let run = cluster.create_run(&ci_request(3, &sha)).await.unwrap();
    let run = cluster.wait_for_run(run.id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    let errored: Vec<&NodeResult> = nodes_of(&run)
        .iter()
        .filter(|node| node.status == "error")
        .collect();
    assert_eq!(errored.len(), 1);
    assert_eq!(errored[0].unique_id, "model.shop.stg_orders");
    assert_eq!(
        run.summary.as_ref().unwrap().skipped,
        20,
        "everything downstream is skipped"
    );
    let log = cluster.log(run.id).await.unwrap();
    assert!(
        log.contains("Parser Error"),
        "dbt's error is in the stored log:\n{log}"
    );
    assert!(log.contains("syntax error"), "{log}");
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pr_that_would_write_outside_its_own_database_is_refused_before_anything_runs() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    cluster.deploy().await.unwrap();
    let production_before = dump_database(&cluster.production_database(), None).unwrap();
    // A model that names production's catalog as its database.
    let sha = cluster
        .origin
        .pull_request(
            5,
            &[
                edits::ADD_COLUMN,
                (
                    "models/marts/into_production.sql",
                    "",
                    "{{ config(database='prod', materialized='table') }}\nselect * from {{ ref('stg_orders') }}\n",
                ),
            ],
        )
        .unwrap();
    let run = cluster.create_run(&ci_request(5, &sha)).await.unwrap();
    let run = cluster.wait_for_run(run.id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(run.status, RunStatus::Error, "{run:?}");
    let message = run.message.clone().unwrap();
    let log = cluster.log(run.id).await.unwrap();
    assert!(
        message.starts_with("refused before building: 1 node(s) would be written outside this PR's own database `pr`"),
        "{message}\n{log}"
    );
    assert!(
        message.contains("model.shop.into_production → prod.main"),
        "{message}"
    );
    // Nothing ran: no node results, and production is as it was.
    assert!(nodes_of(&run).is_empty(), "{run:?}");
    assert_eq!(
        dump_database(&cluster.production_database(), None).unwrap(),
        production_before
    );
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_4xx_and_queue_nothing() {
    // No agent: anything queued would stay in the queue, where we can count it.
    let mut cluster = Cluster::start(ClusterOptions {
        agents: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let sha = cluster.origin.main_sha().unwrap();
    // Raw JSON on purpose: these requests are wrong on the wire (an unknown field among them),
    // which the typed `RunRequest` cannot express.
    let cases = [
        (
            json!({ "repository": "nope", "pr": 1, "sha": sha }),
            "unknown repository `nope`",
        ),
        (
            json!({ "repository": "shop", "pr": 1, "sha": "abc123" }),
            "is not a commit SHA",
        ),
        (
            json!({ "repository": "shop", "sha": sha }),
            "needs the pull request number",
        ),
        (
            json!({ "repository": "shop", "pr": 1 }),
            "needs the head commit",
        ),
        (
            json!({ "repository": "shop", "pr": 1, "sha": sha, "kind": "nightly" }),
            "unknown run kind",
        ),
        (
            json!({ "repository": "shop", "pr": 1, "sha": sha, "colour": "blue" }),
            "unknown field `colour`",
        ),
        (
            json!({ "repository": "shop", "kind": "deploy", "ref": "--upload-pack=evil" }),
            "is not a usable git ref",
        ),
    ];
    for (body, message) in cases {
        let (status, answer) = cluster.post_run_json(&body).await.unwrap();
        assert_eq!(status, 400, "{body} -> {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(message),
            "{body} -> {answer}"
        );
    }
    let response = cluster
        .http
        .post(format!("{}/api/v1/runs", cluster.url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = cluster
        .http
        .post(format!("{}/api/v1/runs", cluster.url))
        .body(vec![b' '; 70_000])
        .send()
        .await
        .unwrap();
    // Just over the 64 KiB JSON limit: small enough to be written whole before the server
    // answers, so the client reads the 413 rather than a reset connection.
    assert_eq!(response.status(), 413, "oversized bodies are refused");
    assert!(
        cluster.runs().await.unwrap().is_empty(),
        "nothing was recorded"
    );

    // Day one: a CI run with no production state names both ways to make one (deploy, or
    // publish a manifest made elsewhere), and is not queued.
    let submitted = cluster.post_run(&ci_request(1, &sha)).await.unwrap();
    let run = submitted.run;
    assert!(submitted.created, "{run:?}");
    assert_eq!(run.status, RunStatus::Error);
    let message = run.message.as_deref().unwrap();
    assert!(
        message.contains("Deploy with `slimci deploy --repo shop` first"),
        "{run:?}"
    );
    assert!(
        message.contains("slimci state publish --repo shop --sha <commit> target/manifest.json"),
        "{run:?}"
    );

    // Other routes: unknown and malformed ids, unauthenticated agent calls. A malformed id
    // and the agent's routes are not the typed user API: raw HTTP there.
    let malformed = cluster
        .http
        .get(format!("{}/api/v1/runs/not-a-uuid", cluster.url))
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    assert_eq!(
        refusal(cluster.client.run(RunId::new()).await),
        Some(StatusCode::NOT_FOUND)
    );
    assert_eq!(
        refusal(cluster.client.production_state("shop").await),
        Some(StatusCode::NOT_FOUND)
    );
    let upload = cluster
        .http
        .put(format!(
            "{}/api/v1/runs/{}/artifacts/manifest.json",
            cluster.url, run.id
        ))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        upload.status(),
        401,
        "artifact uploads need the agent token"
    );
    let claim = cluster
        .http
        .post(format!("{}/api/v1/agent/claim", cluster.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(claim.status(), 401);
    assert_eq!(
        refusal(cluster.client.cancel(run.id).await),
        Some(StatusCode::CONFLICT),
        "a finished run cannot be cancelled"
    );

    assert_eq!(
        cluster.queue_depth("jobs").await.unwrap(),
        0,
        "nothing was queued"
    );
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cancelled_while_queued_never_builds() {
    let mut cluster = Cluster::start(ClusterOptions {
        agents: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let id = cluster.post_run(&deploy_request()).await.unwrap().run.id;
    wait_for(
        "the job to reach the queue",
        Duration::from_secs(30),
        || async { Ok((cluster.queue_depth("jobs").await? == 1).then_some(())) },
    )
    .await
    .unwrap();
    let output = cluster.run_cli(&["cancel", &id.to_string()]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(cluster.run(id).await.unwrap().status, RunStatus::Cancelled);

    // An agent now takes the stale job: its claim is refused, and it goes on to the next one.
    cluster.start_agent("late-agent", 1).unwrap();
    wait_for(
        "the stale job to be taken",
        Duration::from_secs(60),
        || async { Ok((cluster.queue_depth("jobs").await? == 0).then_some(())) },
    )
    .await
    .unwrap();
    let deploy = cluster.deploy().await.unwrap();
    assert_eq!(deploy.status, RunStatus::Success);
    let cancelled = cluster.run(id).await.unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    assert!(
        phases_of(&cancelled).is_empty(),
        "it never started: {cancelled:?}"
    );
    let agent_log = std::fs::read_to_string(&cluster.agents[0].log).unwrap();
    assert!(agent_log.contains("claim refused"), "{agent_log}");
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_build_four_prs_in_parallel() {
    let mut cluster = Cluster::start(ClusterOptions {
        agents: 2,
        slots: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    cluster.deploy().await.unwrap();
    let mut ids = Vec::new();
    let shas: Vec<String> = (10..14)
        .map(|pr| {
            cluster
                .origin
                .pull_request(pr, &[edits::ADD_COLUMN])
                .unwrap()
        })
        .collect();
    for (pr, sha) in (10..14).zip(&shas) {
        let run = cluster.create_run(&ci_request(pr, sha)).await.unwrap();
        ids.push(run.id);
    }
    let mut builds = Vec::new();
    let mut agents = BTreeSet::new();
    for id in &ids {
        let run = cluster.wait_for_run(*id, RUN_TIMEOUT).await.unwrap();
        assert_eq!(run.status, RunStatus::Success, "{run:?}");
        agents.insert(run.agent.clone().unwrap());
        let build = phases_of(&run)
            .iter()
            .find(|phase| phase.phase == "build")
            .unwrap();
        let time = |text: Option<&str>| ms_of(text.unwrap()).unwrap();
        builds.push((
            time(Some(&build.started_at)),
            time(build.finished_at.as_deref()),
        ));
    }
    assert_eq!(agents.len(), 2, "both agents built: {agents:?}");
    let overlapping = builds
        .iter()
        .enumerate()
        .any(|(i, a)| builds.iter().skip(i + 1).any(|b| a.0 < b.1 && b.0 < a.1));
    assert!(overlapping, "some builds ran at the same time: {builds:?}");
    for pr in 10..14 {
        assert!(
            cluster.pr_database(pr).is_file(),
            "PR {pr} has its own database"
        );
    }
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_job_queue_is_dead_lettered_and_the_agent_serves_on() {
    use lapin::options::{BasicGetOptions, BasicPublishOptions};
    let mut cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    let connection = lapin::Connection::connect(
        slimci_tests::AMQP_URL,
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    // Wait for the agent to declare the topology before publishing into it.
    wait_for("the job queue", Duration::from_secs(30), || async {
        Ok(cluster.queue_depth("jobs").await.ok())
    })
    .await
    .unwrap();
    let jobs = format!("{}.jobs", cluster.prefix);
    let future_version =
        json!({ "protocol": 99, "type": "job", "run_id": uuid::Uuid::now_v7() }).to_string();
    for payload in [
        b"\xff\xfe not json at all".to_vec(),
        future_version.into_bytes(),
    ] {
        channel
            .basic_publish(
                "".into(),
                jobs.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_for(
        "both messages to be dead-lettered",
        Duration::from_secs(30),
        || async { Ok((cluster.queue_depth("jobs.dead").await? == 2).then_some(())) },
    )
    .await
    .unwrap();
    let dead = format!("{}.jobs.dead", cluster.prefix);
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let message = channel
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap();
        let headers = message.delivery.properties.headers().clone().unwrap();
        let reason = match headers.inner().get("x-slimci-dead-reason").unwrap() {
            lapin::types::AMQPValue::LongString(text) => {
                String::from_utf8_lossy(text.as_bytes()).into_owned()
            }
            other => panic!("unexpected header {other:?}"),
        };
        reasons.push(reason);
    }
    assert!(reasons[0].contains("is not JSON"), "{reasons:?}");
    assert!(
        reasons[1].contains("unsupported protocol version 99; this build speaks version 1"),
        "{reasons:?}"
    );
    let _ = connection.close(200, "bye".into()).await;

    // The agent is still there and builds the next job.
    let deploy = cluster.deploy().await.unwrap();
    assert_eq!(deploy.status, RunStatus::Success);
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_logs_and_production_state_survive_a_coordinator_restart() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    let deploy = cluster.deploy().await.unwrap();
    let sha = cluster
        .origin
        .pull_request(7, &[edits::ADD_COLUMN])
        .unwrap();
    let run = cluster.post_run(&ci_request(7, &sha)).await.unwrap().run;
    let first = cluster.wait_for_run(run.id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(first.status, RunStatus::Success);
    let log_before = cluster.log(first.id).await.unwrap();
    assert!(log_before.contains("Done. PASS=21"));

    cluster.restart_coordinator().await.unwrap();

    let after = cluster.run(first.id).await.unwrap();
    assert_eq!(after.status, RunStatus::Success);
    assert_eq!(after.nodes, first.nodes);
    assert_eq!(after.phases, first.phases);
    assert_eq!(cluster.log(first.id).await.unwrap(), log_before);
    assert_eq!(cluster.runs().await.unwrap().len(), 2);
    let state = cluster.production_state().await.unwrap();
    assert_eq!(state.deploy_run_id, deploy.id);

    // And the restarted coordinator goes on working with the same agent.
    let sha = cluster
        .origin
        .pull_request(8, &[edits::ADD_COLUMN])
        .unwrap();
    let run = cluster.post_run(&ci_request(8, &sha)).await.unwrap().run;
    let second = cluster.wait_for_run(run.id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(second.status, RunStatus::Success);
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_deploy_leaves_production_and_its_state_as_they_were() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    let good = cluster.deploy().await.unwrap();
    let production_before = dump_database(&cluster.production_database(), None).unwrap();

    // Break main: a deploy of it fails a test after building models into its copy.
    let broken = cluster
        .origin
        .pull_request(99, &[edits::FAIL_TEST])
        .unwrap();
    let run = cluster
        .create_run(&RunRequest {
            sha: Some(broken.clone()),
            git_ref: Some("refs/pull/99/head".to_owned()),
            ..deploy_request()
        })
        .await
        .unwrap();
    let failed = cluster.wait_for_run(run.id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(failed.status, RunStatus::Failed, "{failed:?}");
    assert_eq!(failed.sha.as_deref(), Some(broken.as_str()));

    let production_after = dump_database(&cluster.production_database(), None).unwrap();
    assert_eq!(
        production_after, production_before,
        "production data is untouched"
    );
    let state = cluster.production_state().await.unwrap();
    assert_eq!(
        state.deploy_run_id, good.id,
        "production state still points at the good deploy"
    );
    let deploys = std::fs::read_dir(cluster.warehouse().join("shop/deploys"))
        .unwrap()
        .count();
    assert_eq!(deploys, 1, "the failed deploy's copy was removed");
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slimci_teardown_drops_a_closed_prs_database_for_any_ci_system() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    cluster.deploy().await.unwrap();
    let sha = cluster
        .origin
        .pull_request(40, &[edits::ADD_COLUMN])
        .unwrap();
    let run = cluster.post_run(&ci_request(40, &sha)).await.unwrap().run;
    assert_eq!(
        cluster
            .wait_for_run(run.id, RUN_TIMEOUT)
            .await
            .unwrap()
            .status,
        RunStatus::Success
    );
    assert!(cluster.pr_database(40).is_file());
    let output = cluster
        .run_cli(&["teardown", "--repo", "shop", "--pr", "40"])
        .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("teardown of shop PR #40"), "{stdout}");
    assert!(stdout.contains("dropped pr_shop_40"), "{stdout}");
    assert!(!cluster.pr_database(40).exists());
    assert!(cluster.production_database().is_file());
    cluster.assert_all_alive();
}
