//! slimci and dbt Cloud as each other's overflow capacity (`[repository.dbt_cloud] routing`):
//! a routed CI run triggers the Cloud CI job while dbt Cloud has room and is mirrored like a
//! fleet run (status, step logs, artifacts, nodes); a full dbt Cloud (counted across every page
//! of its runs) or a fleet with room keeps it on the fleet; a newer commit cancels the Cloud run
//! and waits for dbt Cloud to confirm; 429s, 5xx and lost answers trigger nothing twice; a
//! restarted coordinator takes its Cloud runs up again.
//!
//! Real coordinator, agent and RabbitMQ with the stub dbt for fleet builds; dbt Cloud is the
//! fake of `slimci_tests::dbt_cloud` (it cannot be reached from here), written from the
//! Administrative API v2 contract, and each test checks what it received. The production
//! state from dbt Cloud is tested in `state.rs`.

use std::time::Duration;

use serde_json::{Value, json};
use slimci_client::{Backend, RunStatus, RunView};
use slimci_tests::dbt_cloud::{CANCELLED, FakeDbtCloud, FakeRun, RUNNING, SUCCESS};
use slimci_tests::github::FakeGitHub;
use slimci_tests::origin::git;
use slimci_tests::{
    Cluster, ClusterOptions, WEBHOOK_SECRET, binary, ci_request, phases_of, wait_for,
    workspace_root,
};

const TIMEOUT: Duration = Duration::from_secs(120);
const CI_JOB: u64 = 12;
const TOKEN: &str = "cloud-service-token";
const GITHUB_TOKEN: &str = "github-installation-token";
const GITHUB_REPOSITORY: &str = "acme/shop";

/// A cluster whose `shop` repository routes CI runs with `routing` (plus `extra` keys of its
/// `[repository.dbt_cloud]`), production deployed by the fleet with an instant stub build.
async fn hybrid(cloud: &FakeDbtCloud, work: &std::path::Path, dbt_cloud: &str) -> Cluster {
    hybrid_with(cloud, work, dbt_cloud, None, None).await
}

/// `hybrid`, with the run timeout and, if given, the repository on the fake GitHub as
/// `acme/shop`.
async fn hybrid_with(
    cloud: &FakeDbtCloud,
    work: &std::path::Path,
    dbt_cloud: &str,
    run_timeout_secs: Option<u64>,
    github: Option<&FakeGitHub>,
) -> Cluster {
    let (github_repository, github_toml) = match github {
        Some(github) => {
            github.accept_token(GITHUB_TOKEN);
            (
                format!("github = \"{GITHUB_REPOSITORY}\"\n"),
                format!(
                    "[github]\napi_url = \"{}\"\nwebhook_secret = \"{WEBHOOK_SECRET}\"\ntoken = \"{GITHUB_TOKEN}\"\n",
                    github.url
                ),
            )
        }
        None => (String::new(), String::new()),
    };
    let token_file = work.join("dbt-cloud-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut cluster = Cluster::start(ClusterOptions {
        agents: 1,
        slots: 1,
        dbt: Some(binary("slimci-stub-dbt")),
        project: Some(workspace_root().join("tests/fixtures/stub")),
        coordinator_toml: github_toml,
        repository_toml: format!(
            r#"{github_repository}[repository.dbt_cloud]
account_id = {account}
api_url = "{url}"
token_file = "{token_file}"
ci_job_id = {CI_JOB}
run_poll_secs = 1
{dbt_cloud}
"#,
            account = cloud.account_id,
            url = cloud.url,
            token_file = token_file.display(),
        ),
        run_timeout_secs,
        ..Default::default()
    })
    .await
    .unwrap();
    cluster
        .origin
        .commit_file_on_main("slimci_stub.json", &stub(0).to_string())
        .unwrap();
    cluster.deploy().await.unwrap();
    cluster
}

fn stub(duration_ms: u64) -> Value {
    json!({ "duration_ms": duration_ms, "nodes": 3, "log_lines": 3 })
}

/// A new commit of PR `pr` whose fleet build behaves as `stub` (each commit's file differs).
fn commit(cluster: &Cluster, pr: u64, stub: &Value) -> String {
    let current = git(&cluster.origin.path, &["show", "main:slimci_stub.json"]).unwrap();
    let mut stub = stub.clone();
    stub["commit"] = json!(uuid::Uuid::new_v4().to_string());
    cluster
        .origin
        .pull_request(pr, &[("slimci_stub.json", &current, &stub.to_string())])
        .unwrap()
}

/// The run once it is routed (its `backend` set).
async fn routed(cluster: &Cluster, id: slimci_proto::RunId) -> RunView {
    wait_for("the run to be routed", TIMEOUT, || async {
        let run = cluster.run(id).await?;
        Ok(run.backend.is_some().then_some(run))
    })
    .await
    .unwrap()
}

/// The Cloud run triggered for slimci run `id`.
async fn triggered_for(cloud: &FakeDbtCloud, id: slimci_proto::RunId) -> FakeRun {
    let cause = format!("slimci run {id}");
    wait_for("the CI job to be triggered", TIMEOUT, || async {
        Ok(cloud
            .triggered()
            .into_iter()
            .find(|run| run.cause().is_some_and(|found| found.starts_with(&cause))))
    })
    .await
    .unwrap()
}

/// dbt's `run_results.json` of a CI build in dbt Cloud: two models and a failing test when
/// `failing`.
fn run_results(failing: bool) -> Vec<u8> {
    let node = |id: &str, status: &str, thread: &str, message: Value| {
        json!({
            "unique_id": id, "status": status, "execution_time": 1.25, "thread_id": thread,
            "message": message, "failures": if status == "fail" { json!(2) } else { Value::Null },
            "adapter_response": {"rows_affected": 7},
            "timing": [
                {"name": "compile", "started_at": "2026-11-30T10:01:00.000000Z", "completed_at": "2026-11-30T10:01:00.100000Z"},
                {"name": "execute", "started_at": "2026-11-30T10:01:00.100000Z", "completed_at": "2026-11-30T10:01:01.350000Z"}
            ],
            "relation_name": format!("\"analytics\".\"pr_shop_1\".\"{}\"", id.rsplit('.').next().unwrap()),
        })
    };
    let mut results = vec![
        node(
            "model.shop.orders",
            "success",
            "Thread-1",
            json!("SUCCESS 7"),
        ),
        node(
            "model.shop.customers",
            "success",
            "Thread-2",
            json!("SUCCESS 7"),
        ),
    ];
    if failing {
        results.push(node(
            "test.shop.not_null_orders_id",
            "fail",
            "Thread-1",
            json!("Got 2 results, configured to fail if != 0"),
        ));
    }
    serde_json::to_vec(&json!({
        "metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/run-results/v6.json", "dbt_version": "1.11.2"},
        "results": results,
        "elapsed_time": 2.5,
        "args": {"which": "build"},
    }))
    .unwrap()
}

/// dbt Cloud building run `id`: its clone step, then its build step, as the API shows them.
fn building(cloud: &FakeDbtCloud, id: u64) {
    cloud.update(id, |run| {
        run.status = RUNNING;
        run.steps = vec![(
            "Clone git repository".to_owned(),
            SUCCESS,
            "Cloning into '/tmp/jobs/1/target'...\nChecked out the commit".to_owned(),
        )];
    });
}

fn built(cloud: &FakeDbtCloud, id: u64, failing: bool) {
    cloud.update(id, |run| {
        run.steps.push((
            "Invoke dbt with `dbt build --select state:modified+`".to_owned(),
            if failing { 20 } else { SUCCESS },
            "1 of 2 OK created sql table model pr_shop_1.orders\n2 of 2 OK created sql table model pr_shop_1.customers".to_owned(),
        ));
        run.artifacts
            .insert("run_results.json".to_owned(), run_results(failing));
        run.artifacts
            .insert("manifest.json".to_owned(), br#"{"metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json"}, "nodes": {}}"#.to_vec());
        run.status = if failing { 20 } else { SUCCESS };
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_room_in_dbt_cloud_a_run_is_built_there_and_mirrored_to_success_with_nodes_and_artifacts()
 {
    let cloud = FakeDbtCloud::start(9_001, TOKEN).await;
    cloud.set_run_slots(Some(4));
    let github = FakeGitHub::start().await;
    let work = tempfile::tempdir().unwrap();
    let mut cluster = hybrid_with(
        &cloud,
        work.path(),
        "routing = \"cloud_first\"",
        None,
        Some(&github),
    )
    .await;
    // Two of the account's runs are in flight in another job, one of them queued.
    cloud.add_run(FakeRun::new(500, 77, RUNNING));
    cloud.add_run(FakeRun::new(501, 77, 1).created_secs_ago(5));

    let sha = commit(&cluster, 1, &stub(0));
    let run = cluster.create_run(&ci_request(1, &sha)).await.unwrap();
    let run = routed(&cluster, run.id).await;
    assert_eq!(run.backend, Some(Backend::DbtCloud), "{run:?}");
    let reason = run.backend_reason.clone().unwrap();
    assert!(
        reason.starts_with(
            "cloud_first; dbt Cloud: 2 of 4 run slots busy, 1 queued (the oldest for "
        ),
        "{reason}"
    );
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.agent.as_deref(), Some("dbt-cloud"));

    // What dbt Cloud was asked to build: the PR's commit, into the PR's isolation.
    let triggered = triggered_for(&cloud, run.id).await;
    assert_eq!(triggered.job_definition_id, CI_JOB);
    assert_eq!(triggered.trigger["git_sha"], sha.as_str());
    assert_eq!(triggered.trigger["github_pull_request_id"], 1);
    assert_eq!(triggered.trigger["schema_override"], "pr_shop_1");
    assert_eq!(
        triggered.cause(),
        Some(
            format!(
                "slimci run {} attempt 1: shop PR #1 at {}",
                run.id,
                &sha[..12]
            )
            .as_str()
        )
    );
    assert_eq!(run.isolation.as_deref(), Some("pr_shop_1"));

    // Its step logs follow into the run's log while it builds.
    building(&cloud, triggered.id);
    wait_for("the clone step's log", TIMEOUT, || async {
        Ok(cluster
            .log(run.id)
            .await?
            .contains("Checked out the commit")
            .then_some(()))
    })
    .await
    .unwrap();
    let running = cluster.run(run.id).await.unwrap();
    assert_eq!(running.dbt_cloud_run_id, Some(triggered.id));
    assert_eq!(running.status, RunStatus::Running);
    // The fleet page lists it as built by dbt Cloud, not by an agent it does not know.
    let fleet = cluster
        .http
        .get(format!("{}/fleet", cluster.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        fleet.contains("<tr class=\"agent\" id=\"agent-dbt-cloud\"><td>dbt-cloud</td><td class=\"a-dbt_cloud\">dbt_cloud</td>"),
        "{fleet}"
    );

    built(&cloud, triggered.id, false);
    let done = cluster.wait_for_run(run.id, TIMEOUT).await.unwrap();
    assert_eq!(done.status, RunStatus::Success, "{done:?}");
    let log = cluster.log(run.id).await.unwrap();
    for line in [
        &format!(
            "dbt Cloud run {} of CI job {CI_JOB}: https://cloud.getdbt.com/deploy/",
            triggered.id
        ),
        "== dbt Cloud step 1: Clone git repository",
        "== dbt Cloud step 2: Invoke dbt with `dbt build --select state:modified+`",
        "2 of 2 OK created sql table model pr_shop_1.customers",
    ] {
        assert!(log.contains(line), "{line} not in:\n{log}");
    }
    let nodes = done.nodes.clone().unwrap();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert!(nodes.iter().all(|node| node.status == "success"));
    assert!(
        nodes
            .iter()
            .any(|node| node.unique_id == "model.shop.orders"
                && node.relation.as_deref() == Some("\"analytics\".\"pr_shop_1\".\"orders\""))
    );
    let artifacts: Vec<String> = done
        .artifacts
        .clone()
        .unwrap()
        .into_iter()
        .map(|artifact| artifact.name)
        .collect();
    assert!(
        artifacts.contains(&"run_results.json".to_owned())
            && artifacts.contains(&"manifest.json".to_owned()),
        "{artifacts:?}"
    );
    assert_eq!(
        cluster
            .client
            .artifact(run.id, "run_results.json")
            .await
            .unwrap(),
        run_results(false)
    );
    let phases = done.phases.clone().unwrap();
    assert!(
        phases.iter().any(|phase| phase.phase == "build"),
        "{phases:?}"
    );

    // GitHub hears of it as of a fleet build: a pending status, then success, and the PR's
    // comment with the run's result, both linking to the run's page.
    let statuses = wait_for("the success status on GitHub", TIMEOUT, || async {
        let statuses = github.statuses(&sha);
        Ok(statuses
            .last()
            .is_some_and(|status| status["state"] == "success")
            .then_some(statuses))
    })
    .await
    .unwrap();
    assert_eq!(statuses[0]["state"], "pending", "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|status| status["target_url"] == done.url.as_str()),
        "{statuses:?}"
    );
    let comment = wait_for("the PR's comment", TIMEOUT, || async {
        Ok(github
            .comments(GITHUB_REPOSITORY, 1)
            .first()
            .filter(|(_, body)| body.contains("success"))
            .map(|(_, body)| body.clone()))
    })
    .await
    .unwrap();
    assert!(
        comment.contains(&sha[..7]) && comment.contains(&done.url),
        "{comment}"
    );

    // The run's page says where it was built and why.
    let page = cluster
        .http
        .get(format!("{}/runs/{}", cluster.url, run.id))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(&format!(
            "<dd id=\"backend\">dbt Cloud, run {}",
            triggered.id
        )) && page.contains("cloud_first; dbt Cloud: 2 of 4 run slots busy"),
        "{page}"
    );

    // `slimci runs` says where it was built.
    let listed = cluster.run_cli(&["runs"]).await;
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(&format!("dbt_cloud:{}", triggered.id)),
        "{listed}"
    );

    // Every request carried the token; the load was read across the account's runs.
    let requests = cloud.requests();
    assert!(
        requests
            .iter()
            .all(|request| request.authorization.as_deref()
                == Some(&format!("Token {TOKEN}") as &str)),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|request| request.path.ends_with("/runs/")
                && request.query.get("status__in").map(String::as_str) == Some("[1,2,3]"))
    );
    assert_eq!(
        requests
            .iter()
            .filter(|request| request.method == "POST"
                && request.path.ends_with(&format!("/jobs/{CI_JOB}/run/")))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_dbt_cloud_counted_across_every_page_leaves_the_run_to_the_fleet() {
    let cloud = FakeDbtCloud::start(9_001, TOKEN).await;
    // CI runs take no run slot on this plan: the configured cap is the limit, and 130 runs in
    // flight are more than one page of 100.
    cloud.set_run_slots(None);
    for id in 0..130 {
        cloud.add_run(FakeRun::new(1_000 + id, 77, RUNNING));
    }
    let work = tempfile::tempdir().unwrap();
    let mut cluster = hybrid(
        &cloud,
        work.path(),
        "routing = \"cloud_first\"\nmax_in_flight = 120",
    )
    .await;

    let sha = commit(&cluster, 1, &stub(0));
    let run = cluster.create_run(&ci_request(1, &sha)).await.unwrap();
    let run = routed(&cluster, run.id).await;
    assert_eq!(run.backend, Some(Backend::Fleet), "{run:?}");
    assert_eq!(
        run.backend_reason.as_deref(),
        Some(
            "cloud_first, but dbt Cloud has no room; dbt Cloud: 130 of at most 120 runs in flight"
        )
    );
    let done = cluster.wait_for_run(run.id, TIMEOUT).await.unwrap();
    assert_eq!(done.status, RunStatus::Success, "{done:?}");
    assert_eq!(done.agent.as_deref(), Some(cluster.agents[0].name.as_str()));
    assert!(cloud.triggered().is_empty());
    // Both pages were read.
    let offsets: Vec<String> = cloud
        .requests()
        .iter()
        .filter(|request| request.query.contains_key("status__in"))
        .filter_map(|request| request.query.get("offset").cloned())
        .collect();
    assert!(
        offsets.contains(&"0".to_owned()) && offsets.contains(&"100".to_owned()),
        "{offsets:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_routed_to_dbt_cloud_counts_against_its_cap_before_dbt_cloud_lists_it() {
    let cloud = FakeDbtCloud::start(9_001, TOKEN).await;
    cloud.set_run_slots(None);
    // dbt Cloud fails the first triggers (making no run), so the first PR's run is routed to
    // dbt Cloud for a few seconds before dbt Cloud lists it.
    cloud.answer_next_triggers(&[(false, 503), (false, 503)]);
    let work = tempfile::tempdir().unwrap();
    let mut cluster = hybrid(
        &cloud,
        work.path(),
        "routing = \"cloud_first\"\nmax_in_flight = 1",
    )
    .await;

    let first = commit(&cluster, 1, &stub(0));
    let first = cluster.create_run(&ci_request(1, &first)).await.unwrap();
    let first = routed(&cluster, first.id).await;
    assert_eq!(first.backend, Some(Backend::DbtCloud), "{first:?}");
    let second = commit(&cluster, 2, &stub(0));
    let second = cluster.create_run(&ci_request(2, &second)).await.unwrap();
    let second = routed(&cluster, second.id).await;
    assert!(
        cloud.triggered().is_empty(),
        "the second run was routed while dbt Cloud listed nothing"
    );
    assert_eq!(second.backend, Some(Backend::Fleet), "{second:?}");
    assert_eq!(
        second.backend_reason.as_deref(),
        Some("cloud_first, but dbt Cloud has no room; dbt Cloud: 1 of at most 1 runs in flight")
    );
    let done = cluster.wait_for_run(second.id, TIMEOUT).await.unwrap();
    assert_eq!(done.status, RunStatus::Success, "{done:?}");

    let triggered = triggered_for(&cloud, first.id).await;
    building(&cloud, triggered.id);
    built(&cloud, triggered.id, false);
    let done = cluster.wait_for_run(first.id, TIMEOUT).await.unwrap();
    assert_eq!(done.status, RunStatus::Success, "{done:?}");
    assert_eq!(cloud.triggered().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_first_overflows_to_dbt_cloud_only_once_the_fleet_was_full_for_its_wait() {
    let cloud = FakeDbtCloud::start(9_001, TOKEN).await;
    let work = tempfile::tempdir().unwrap();
    let mut cluster = hybrid(
        &cloud,
        work.path(),
        "routing = \"fleet_first\"\nfleet_wait_secs = 3",
    )
    .await;
    wait_for("the agent to report its slot", TIMEOUT, || async {
        let agents = cluster.client.agents().await?;
        Ok(agents
            .iter()
            .any(|agent| agent.slots == Some(1))
            .then_some(()))
    })
    .await
    .unwrap();

    // The fleet has room: PR 1 builds there, slowly.
    let slow = commit(&cluster, 1, &stub(20_000));
    let first = cluster.create_run(&ci_request(1, &slow)).await.unwrap();
    let first = routed(&cluster, first.id).await;
    assert_eq!(first.backend, Some(Backend::Fleet), "{first:?}");
    assert_eq!(
        first.backend_reason.as_deref(),
        Some("fleet_first; fleet: 0 of 1 slots taken")
    );
    cluster.wait_building(first.id, TIMEOUT).await.unwrap();

    // The one slot is busy: PR 2 waits for it, then goes to dbt Cloud.
    let sha = commit(&cluster, 2, &stub(0));
    let second = cluster.create_run(&ci_request(2, &sha)).await.unwrap();
    let second = routed(&cluster, second.id).await;
    assert_eq!(second.backend, Some(Backend::DbtCloud), "{second:?}");
    let reason = second.backend_reason.clone().unwrap();
    assert!(
        reason.starts_with("fleet_first, but the fleet was full for 3s; fleet: 1 of 1 slots taken; dbt Cloud: 0 of 4 run slots busy"),
        "{reason}"
    );
    let started = second
        .started_at
        .as_deref()
        .and_then(slimci_tests::measure::ms_of)
        .unwrap();
    let created = slimci_tests::measure::ms_of(&second.created_at).unwrap();
    assert!(
        started - created >= 3_000,
        "routed after {} ms",
        started - created
    );
    let triggered = triggered_for(&cloud, second.id).await;
    assert_eq!(triggered.trigger["schema_override"], "pr_shop_2");
    building(&cloud, triggered.id);
    built(&cloud, triggered.id, true);
    let done = cluster.wait_for_run(second.id, TIMEOUT).await.unwrap();
    // A failing test in dbt Cloud fails the run, with the test's message among its nodes.
    assert_eq!(done.status, RunStatus::Failed, "{done:?}");
    assert_eq!(
        done.message.as_deref(),
        Some(format!("dbt Cloud run {}: 1 of 3 nodes failed", triggered.id).as_str())
    );
    assert!(
        done.nodes.unwrap().iter().any(
            |node| node.message.as_deref() == Some("Got 2 results, configured to fail if != 0")
        )
    );
    cluster.client.cancel(first.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_commit_stops_the_dbt_cloud_run_and_builds_only_once_dbt_cloud_confirmed() {
    let cloud = FakeDbtCloud::start(9_001, TOKEN).await;
    cloud.set_cancel_delay(Duration::from_secs(4));
    let work = tempfile::tempdir().unwrap();
    let mut cluster = hybrid(&cloud, work.path(), "routing = \"cloud_first\"").await;

    let old_sha = commit(&cluster, 1, &stub(0));
    let old = cluster.create_run(&ci_request(1, &old_sha)).await.unwrap();
    let old_cloud = triggered_for(&cloud, old.id).await;
    building(&cloud, old_cloud.id);
    wait_for("the old run to follow its Cloud run", TIMEOUT, || async {
        Ok(cluster
            .log(old.id)
            .await?
            .contains("Checked out")
            .then_some(()))
    })
    .await
    .unwrap();

    let new_sha = commit(&cluster, 1, &stub(0));
    let new = cluster.create_run(&ci_request(1, &new_sha)).await.unwrap();
    // Until dbt Cloud says the old run is cancelled, the isolation is the old run's: nothing
    // else is triggered, and the old run is not over.
    let ended = wait_for("the old run to end", TIMEOUT, || async {
        let run = cluster.run(old.id).await?;
        if !run.status.is_terminal() {
            anyhow::ensure!(
                cloud.triggered().len() == 1,
                "a second build of pr_shop_1 was triggered before dbt Cloud confirmed the cancel"
            );
        }
        Ok(run.status.is_terminal().then_some(run))
    })
    .await
    .unwrap();
    assert_eq!(ended.status, RunStatus::Superseded, "{ended:?}");
    assert!(
        ended
            .message
            .as_deref()
            .unwrap_or_default()
            .starts_with(&format!("superseded by run {}", new.id)),
        "{ended:?}"
    );
    let old_in_cloud = cloud.run(old_cloud.id).unwrap();
    assert!(old_in_cloud.cancel_asked());
    assert_eq!(old_in_cloud.status, CANCELLED);

    let new_cloud = triggered_for(&cloud, new.id).await;
    assert_eq!(new_cloud.trigger["git_sha"], new_sha.as_str());
    assert_eq!(new_cloud.trigger["schema_override"], "pr_shop_1");
    // The new Cloud run was made only after the old one's cancel took effect in dbt Cloud.
    let cancelled_at = old_in_cloud.cancelled_at.expect("the old run's cancel");
    assert!(
        new_cloud.created_at >= cancelled_at,
        "triggered at {} before the cancel took effect at {cancelled_at}",
        new_cloud.created_at
    );
    building(&cloud, new_cloud.id);
    built(&cloud, new_cloud.id, false);
    let done = cluster.wait_for_run(new.id, TIMEOUT).await.unwrap();
    assert_eq!(done.status, RunStatus::Success, "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_errors_and_lost_answers_from_dbt_cloud_lose_nothing_and_trigger_once() {
    let cloud = FakeDbtCloud::start(9_001, TOKEN).await;
    let work = tempfile::tempdir().unwrap();
    let mut cluster = hybrid(&cloud, work.path(), "routing = \"cloud_first\"").await;

    // dbt Cloud rate limits and fails for a while (the reads that route the run meet these);
    // then the trigger is rate limited, fails, and once carried out loses its answer.
    cloud.fail_next(&[429, 500, 502]);
    cloud.answer_next_triggers(&[(false, 429), (false, 503), (true, 502)]);
    let sha = commit(&cluster, 1, &stub(0));
    let run = cluster.create_run(&ci_request(1, &sha)).await.unwrap();
    let routed = routed(&cluster, run.id).await;
    assert_eq!(routed.backend, Some(Backend::DbtCloud), "{routed:?}");
    let triggered = triggered_for(&cloud, run.id).await;
    let found = wait_for("the run to know its Cloud run", TIMEOUT, || async {
        Ok(cluster.run(run.id).await?.dbt_cloud_run_id)
    })
    .await
    .unwrap();
    assert_eq!(found, triggered.id);
    building(&cloud, triggered.id);
    built(&cloud, triggered.id, false);
    let done = cluster.wait_for_run(run.id, TIMEOUT).await.unwrap();
    assert_eq!(done.status, RunStatus::Success, "{done:?}");
    // One Cloud run for the slimci run, whatever was answered.
    let ours: Vec<FakeRun> = cloud
        .triggered()
        .into_iter()
        .filter(|found| {
            found
                .cause()
                .is_some_and(|cause| cause.contains(&run.id.to_string()))
        })
        .collect();
    assert_eq!(ours.len(), 1, "{ours:?}");
    let requests = cloud.requests();
    let posts = requests
        .iter()
        .filter(|request| request.method == "POST" && request.path.ends_with("/run/"))
        .count();
    // The rate limit was sent again at once, the 503 after a look for the run, and the lost
    // answer was looked for, not triggered again.
    assert_eq!(posts, 3, "{requests:?}");
    let searches = requests
        .iter()
        .filter(|request| {
            request.query.get("include_related").map(String::as_str) == Some("[\"trigger\"]")
        })
        .count();
    assert!(searches >= 2, "{requests:?}");

    // A trigger dbt Cloud refuses (a 4xx other than 429) ends the run saying so.
    cloud.answer_next_triggers(&[(false, 400)]);
    let sha = commit(&cluster, 2, &stub(0));
    let refused = cluster.create_run(&ci_request(2, &sha)).await.unwrap();
    let refused = cluster.wait_for_run(refused.id, TIMEOUT).await.unwrap();
    assert_eq!(refused.status, RunStatus::Error, "{refused:?}");
    assert!(
        refused
            .message
            .as_deref()
            .unwrap_or_default()
            .starts_with(&format!(
                "dbt Cloud refused to start CI job {CI_JOB}: dbt Cloud answered 400"
            )),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_cancel_and_the_timeout_stop_the_dbt_cloud_run_once_dbt_cloud_confirms() {
    let cloud = FakeDbtCloud::start(9_001, TOKEN).await;
    cloud.set_cancel_delay(Duration::from_secs(2));
    let work = tempfile::tempdir().unwrap();
    let mut cluster = hybrid_with(
        &cloud,
        work.path(),
        "routing = \"cloud_first\"",
        Some(6),
        None,
    )
    .await;

    // A user's cancel.
    let sha = commit(&cluster, 1, &stub(0));
    let run = cluster.create_run(&ci_request(1, &sha)).await.unwrap();
    let in_cloud = triggered_for(&cloud, run.id).await;
    building(&cloud, in_cloud.id);
    cluster.client.cancel(run.id).await.unwrap();
    let cancelled = cluster.wait_for_run(run.id, TIMEOUT).await.unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled, "{cancelled:?}");
    assert_eq!(
        cancelled.message.as_deref(),
        Some(
            format!(
                "cancelled; dbt Cloud confirmed run {} cancelled",
                in_cloud.id
            )
            .as_str()
        )
    );
    let in_cloud = cloud.run(in_cloud.id).unwrap();
    assert_eq!(in_cloud.status, CANCELLED);
    assert!(
        chrono::Utc::now() >= in_cloud.cancelled_at.unwrap(),
        "the run ended before dbt Cloud's cancel took effect"
    );
    assert!(
        phases_of(&cancelled)
            .iter()
            .any(|phase| phase.phase == "build"),
        "{cancelled:?}"
    );

    // A cancel while the Cloud run still waits in dbt Cloud's queue: nothing was built, and
    // the run says so (no build phase).
    let sha = commit(&cluster, 3, &stub(0));
    let queued = cluster.create_run(&ci_request(3, &sha)).await.unwrap();
    let in_queue = triggered_for(&cloud, queued.id).await;
    wait_for("the run to know its Cloud run", TIMEOUT, || async {
        Ok(cluster.run(queued.id).await?.dbt_cloud_run_id)
    })
    .await
    .unwrap();
    cluster.client.cancel(queued.id).await.unwrap();
    let cancelled = cluster.wait_for_run(queued.id, TIMEOUT).await.unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled, "{cancelled:?}");
    assert!(cloud.run(in_queue.id).unwrap().cancel_asked());
    assert!(
        !phases_of(&cancelled)
            .iter()
            .any(|phase| phase.phase == "build"),
        "{cancelled:?}"
    );

    // A Cloud run that outlives the run's timeout (6 s) is cancelled, and the run times out.
    let sha = commit(&cluster, 2, &stub(0));
    let slow = cluster.create_run(&ci_request(2, &sha)).await.unwrap();
    let in_cloud = triggered_for(&cloud, slow.id).await;
    building(&cloud, in_cloud.id);
    let timed_out = cluster.wait_for_run(slow.id, TIMEOUT).await.unwrap();
    assert_eq!(timed_out.status, RunStatus::TimedOut, "{timed_out:?}");
    assert_eq!(
        timed_out.message.as_deref(),
        Some(
            format!(
                "timed out after 6s; dbt Cloud run {} was cancelled",
                in_cloud.id
            )
            .as_str()
        )
    );
    assert!(cloud.run(in_cloud.id).unwrap().cancel_asked());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_takes_up_its_runs_in_dbt_cloud_again() {
    let cloud = FakeDbtCloud::start(9_001, TOKEN).await;
    let work = tempfile::tempdir().unwrap();
    let mut cluster = hybrid(&cloud, work.path(), "routing = \"cloud_first\"").await;

    let sha = commit(&cluster, 1, &stub(0));
    let run = cluster.create_run(&ci_request(1, &sha)).await.unwrap();
    let triggered = triggered_for(&cloud, run.id).await;
    building(&cloud, triggered.id);
    wait_for("the clone step's log", TIMEOUT, || async {
        Ok(cluster
            .log(run.id)
            .await?
            .contains("Checked out")
            .then_some(()))
    })
    .await
    .unwrap();

    // The coordinator is away while dbt Cloud finishes the build.
    cluster.stop_coordinator();
    built(&cloud, triggered.id, false);
    cluster.start_coordinator_again().await.unwrap();

    let done = cluster.wait_for_run(run.id, TIMEOUT).await.unwrap();
    assert_eq!(done.status, RunStatus::Success, "{done:?}");
    assert_eq!(
        done.attempt,
        slimci_proto::Attempt(1),
        "re-attached, not retried"
    );
    assert_eq!(done.dbt_cloud_run_id, Some(triggered.id));
    assert_eq!(done.nodes.unwrap().len(), 2);
    let log = cluster.log(run.id).await.unwrap();
    assert_eq!(
        log.matches("== dbt Cloud step 1: Clone git repository")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("2 of 2 OK created sql table model pr_shop_1.customers"),
        "{log}"
    );
    assert_eq!(cloud.triggered().len(), 1);
}
