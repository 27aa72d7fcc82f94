//! The PR lifecycle on GitHub, end to end: webhooks into a real coordinator, builds by a real
//! agent with real dbt, and results reported to a fake GitHub API that records what it got.

use std::time::Duration;

use serde_json::{Value, json};
use slimci_client::{RunStatus, RunView};
use slimci_proto::{RunId, RunKind};
use slimci_tests::github::{FakeGitHub, pull_request_payload, push_payload};
use slimci_tests::measure::ms_of;
use slimci_tests::{Cluster, ClusterOptions, WEBHOOK_SECRET, edits, phases_of, wait_for};

const REPO: &str = "acme/shop";
const TOKEN: &str = "ghp_e2e_token";
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// A cluster whose `shop` repository is `acme/shop` on the fake GitHub.
async fn github_cluster(github: &FakeGitHub, agents: usize, slots: u16, extra: &str) -> Cluster {
    github.accept_token(TOKEN);
    Cluster::start(ClusterOptions {
        agents,
        slots,
        repository_toml: format!("github = \"{REPO}\""),
        coordinator_toml: format!(
            "[github]\napi_url = \"{}\"\nwebhook_secret = \"{WEBHOOK_SECRET}\"\ntoken = \"{TOKEN}\"\n{extra}",
            github.url
        ),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn delivery() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn open_pr(
    cluster: &Cluster,
    action: &str,
    number: u64,
    sha: &str,
    draft: bool,
) -> (u16, Value) {
    cluster
        .webhook(
            "pull_request",
            &delivery(),
            &pull_request_payload(REPO, action, number, sha, draft),
            Some(WEBHOOK_SECRET),
        )
        .await
        .unwrap()
}

/// Deploys main through a `push` webhook, as GitHub would on merge.
async fn deploy_by_push(cluster: &mut Cluster) -> RunView {
    let main = cluster.origin.main_sha().unwrap();
    let (status, answer) = cluster
        .webhook(
            "push",
            &delivery(),
            &push_payload(REPO, "refs/heads/main", &main),
            Some(WEBHOOK_SECRET),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{answer}");
    let run = cluster
        .wait_for_run(run_of(&answer), RUN_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Success, "{run:?}");
    assert_eq!(run.kind, RunKind::Deploy);
    run
}

/// The run a webhook's answer names (webhook answers are not the user API: raw JSON).
fn run_of(answer: &Value) -> RunId {
    let id = answer["run"]
        .as_str()
        .unwrap_or_else(|| panic!("no run in {answer}"));
    RunId::parse(id).unwrap()
}

async fn final_status(github: &FakeGitHub, sha: &str) -> Value {
    wait_for(
        &format!("a final status on {sha}"),
        Duration::from_secs(60),
        || async {
            Ok(github
                .statuses(sha)
                .last()
                .filter(|status| status["state"] != "pending")
                .cloned())
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_unsigned_and_foreign_webhooks_queue_nothing() {
    let github = FakeGitHub::start().await;
    let mut cluster = github_cluster(&github, 0, 1, "").await;
    let sha = cluster.origin.main_sha().unwrap();
    let payload = pull_request_payload(REPO, "opened", 1, &sha, false);
    let (status, _) = cluster
        .webhook("pull_request", &delivery(), &payload, None)
        .await
        .unwrap();
    assert_eq!(status, 401, "unsigned");
    let (status, _) = cluster
        .webhook(
            "pull_request",
            &delivery(),
            &payload,
            Some("guessed-secret"),
        )
        .await
        .unwrap();
    assert_eq!(status, 401, "forged");
    let (status, answer) = cluster
        .webhook(
            "ping",
            &delivery(),
            &json!({ "zen": "Keep it logically awesome." }),
            Some(WEBHOOK_SECRET),
        )
        .await
        .unwrap();
    assert_eq!((status, answer["message"].as_str()), (200, Some("pong")));
    let foreign = pull_request_payload("someone/else", "opened", 1, &sha, false);
    let (status, answer) = cluster
        .webhook("pull_request", &delivery(), &foreign, Some(WEBHOOK_SECRET))
        .await
        .unwrap();
    assert_eq!(status, 202);
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("not configured here"),
        "{answer}"
    );
    let (status, _) = cluster
        .webhook(
            "issues",
            &delivery(),
            &json!({ "action": "opened" }),
            Some(WEBHOOK_SECRET),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "other events are acknowledged and ignored");
    let (status, answer) = cluster
        .webhook(
            "pull_request",
            &delivery(),
            &json!({ "action": "opened" }),
            Some(WEBHOOK_SECRET),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "a malformed payload says so: {answer}");
    assert!(cluster.runs().await.unwrap().is_empty());
    assert_eq!(cluster.queue_depth("jobs").await.unwrap(), 0);
    let log = std::fs::read_to_string(&cluster.coordinator.log).unwrap();
    assert!(
        log.contains("refused a GitHub webhook with a missing or wrong signature"),
        "{log}"
    );
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_delivery_twice_runs_once() {
    let github = FakeGitHub::start().await;
    let mut cluster = github_cluster(&github, 1, 1, "").await;
    deploy_by_push(&mut cluster).await;
    let sha = cluster
        .origin
        .pull_request(3, &[edits::ADD_COLUMN])
        .unwrap();
    let payload = pull_request_payload(REPO, "opened", 3, &sha, false);
    let id = delivery();
    let (first, answer) = cluster
        .webhook("pull_request", &id, &payload, Some(WEBHOOK_SECRET))
        .await
        .unwrap();
    assert_eq!(first, 201, "{answer}");
    let (second, again) = cluster
        .webhook("pull_request", &id, &payload, Some(WEBHOOK_SECRET))
        .await
        .unwrap();
    assert_eq!(second, 200);
    assert!(
        again["message"]
            .as_str()
            .unwrap()
            .contains("already processed"),
        "{again}"
    );
    // A different delivery of the same commit (reopened) is answered by the same run.
    let (_, reopened) = open_pr(&cluster, "reopened", 3, &sha, false).await;
    assert_eq!(reopened["run"], answer["run"]);
    let run = cluster
        .wait_for_run(run_of(&answer), RUN_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Success);
    let ci_runs = cluster
        .runs()
        .await
        .unwrap()
        .into_iter()
        .filter(|run| run.kind == RunKind::Ci)
        .count();
    assert_eq!(ci_runs, 1);
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_commit_supersedes_the_running_build_after_its_tree_is_gone() {
    let github = FakeGitHub::start().await;
    let mut cluster = github_cluster(&github, 1, 1, "").await;
    deploy_by_push(&mut cluster).await;
    let first_sha = cluster
        .origin
        .pull_request(5, &[edits::ADD_COLUMN])
        .unwrap();
    let (_, answer) = open_pr(&cluster, "opened", 5, &first_sha, false).await;
    let first_id = run_of(&answer);
    wait_for(
        "the first build to be running dbt",
        Duration::from_secs(60),
        || async {
            let run = cluster.run(first_id).await?;
            let building = phases_of(&run).iter().any(|phase| phase.phase == "build");
            Ok(building.then_some(()))
        },
    )
    .await
    .unwrap();

    // The next commit arrives through the CLI, as from another CI system: same rules.
    let second_sha = cluster
        .origin
        .pull_request(5, &[edits::ADD_COLUMN, edits::RESPACE])
        .unwrap();
    let output = cluster
        .run_cli(&[
            "trigger",
            "--repo",
            "shop",
            "--pr",
            "5",
            "--sha",
            &second_sha,
        ])
        .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let first = cluster.wait_for_run(first_id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(first.status, RunStatus::Superseded, "{first:?}");
    let runs = cluster.runs().await.unwrap();
    let second = runs
        .iter()
        .find(|run| run.sha.as_deref() == Some(second_sha.as_str()))
        .unwrap();
    let second = cluster.run(second.id).await.unwrap();
    assert_eq!(second.status, RunStatus::Success);
    assert_eq!(first.superseded_by, Some(second.id));
    // The old tree was confirmed gone (its agent's final report) before the new one was
    // handed out, so before its dbt started.
    let millis = |text: Option<&str>| ms_of(text.unwrap()).unwrap();
    let new_build = phases_of(&second)
        .iter()
        .find(|phase| phase.phase == "build")
        .unwrap();
    assert!(
        millis(first.finished_at.as_deref()) <= millis(second.started_at.as_deref()),
        "{first:?}\n{second:?}"
    );
    assert!(millis(first.finished_at.as_deref()) <= millis(Some(&new_build.started_at)));
    let agent_log = std::fs::read_to_string(&cluster.agents[0].log).unwrap();
    assert!(
        agent_log.contains("cancelling"),
        "the agent stopped the old build:\n{agent_log}"
    );

    let old_status = final_status(&github, &first_sha).await;
    assert_eq!(old_status["state"], "error");
    assert!(
        old_status["description"]
            .as_str()
            .unwrap()
            .contains("superseded"),
        "{old_status}"
    );
    let new_status = final_status(&github, &second_sha).await;
    assert_eq!(new_status["state"], "success", "{new_status}");
    assert_eq!(new_status["context"], "slimci/dbt");
    assert!(
        new_status["description"]
            .as_str()
            .unwrap()
            .contains("6 built"),
        "{new_status}"
    );
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_prs_with_two_slots_two_run_and_one_waits_in_line() {
    let github = FakeGitHub::start().await;
    let mut cluster = github_cluster(&github, 1, 2, "").await;
    deploy_by_push(&mut cluster).await;
    let mut ids = Vec::new();
    for pr in 20..23 {
        let sha = cluster
            .origin
            .pull_request(pr, &[edits::ADD_COLUMN])
            .unwrap();
        let (status, answer) = open_pr(&cluster, "opened", pr, &sha, false).await;
        assert_eq!(status, 201, "{answer}");
        ids.push(run_of(&answer));
    }
    let waiting = wait_for(
        "two running and one waiting",
        Duration::from_secs(60),
        || async {
            let mut running = 0;
            let mut queued = Vec::new();
            for id in &ids {
                let run = cluster.run(*id).await?;
                match run.status {
                    RunStatus::Running => running += 1,
                    RunStatus::Queued => queued.push(run),
                    _ => {}
                }
            }
            Ok((running == 2 && queued.len() == 1).then(|| queued.remove(0)))
        },
    )
    .await
    .unwrap();
    assert_eq!(waiting.queue_position, Some(1), "{waiting:?}");
    let pending = github.statuses(waiting.sha.as_deref().unwrap());
    assert!(pending.iter().all(|status| status["state"] == "pending"));
    for id in &ids {
        assert_eq!(
            cluster.wait_for_run(*id, RUN_TIMEOUT).await.unwrap().status,
            RunStatus::Success
        );
    }
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drafts_wait_until_ready_for_review() {
    let github = FakeGitHub::start().await;
    let mut cluster = github_cluster(&github, 1, 1, "").await;
    deploy_by_push(&mut cluster).await;
    let sha = cluster
        .origin
        .pull_request(9, &[edits::ADD_COLUMN])
        .unwrap();
    let (status, answer) = open_pr(&cluster, "opened", 9, &sha, true).await;
    assert_eq!(status, 200);
    assert!(
        answer["message"].as_str().unwrap().contains("draft"),
        "{answer}"
    );
    assert!(answer["run"].is_null());
    assert_eq!(
        cluster
            .runs()
            .await
            .unwrap()
            .iter()
            .filter(|run| run.kind == RunKind::Ci)
            .count(),
        0
    );
    let (status, answer) = open_pr(&cluster, "ready_for_review", 9, &sha, false).await;
    assert_eq!(status, 201, "{answer}");
    let run = cluster
        .wait_for_run(run_of(&answer), RUN_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Success);
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_comment_per_pr_updated_in_place_through_a_github_app_and_github_errors() {
    // Authenticate as a GitHub App this time: JWT → installation token.
    let github = FakeGitHub::start().await;
    let keys = tempfile::tempdir().unwrap();
    let private = keys.path().join("app.pem");
    let public = keys.path().join("app.pub.pem");
    for args in [
        vec!["genrsa", "-out", private.to_str().unwrap(), "2048"],
        vec![
            "rsa",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ],
    ] {
        let status = std::process::Command::new("openssl")
            .args(&args)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "openssl {args:?}");
    }
    github.install_app(31337, std::fs::read(&public).unwrap());
    let mut cluster = Cluster::start(ClusterOptions {
        agents: 1,
        slots: 1,
        repository_toml: format!("github = \"{REPO}\""),
        coordinator_toml: format!(
            "[github]\napi_url = \"{}\"\nwebhook_secret = \"{WEBHOOK_SECRET}\"\napp_id = 31337\napp_private_key_file = \"{}\"\n",
            github.url,
            private.display()
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    // GitHub is having a bad minute: the first statuses fail with 502, then a rate limit.
    github.fail_next_statuses(2);
    github.rate_limit_next_statuses(1);
    deploy_by_push(&mut cluster).await;

    let mut shas = Vec::new();
    for (round, edit) in [edits::ADD_COLUMN, edits::FAIL_TEST, edits::ADD_COLUMN]
        .into_iter()
        .enumerate()
    {
        let sha = cluster.origin.pull_request(11, &[edit]).unwrap();
        let action = if round == 0 { "opened" } else { "synchronize" };
        let (_, answer) = open_pr(&cluster, action, 11, &sha, false).await;
        let run = cluster
            .wait_for_run(run_of(&answer), RUN_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(
            run.status,
            if round == 1 {
                RunStatus::Failed
            } else {
                RunStatus::Success
            },
            "{run:?}"
        );
        final_status(&github, &sha).await;
        shas.push(sha);
    }
    let last_sha = &shas[2][..12];
    let comment = wait_for(
        "the comment to show the last run",
        Duration::from_secs(60),
        || async {
            let comments = github.comments(REPO, 11);
            Ok(comments
                .first()
                .filter(|(_, body)| body.contains(last_sha) && body.contains("success"))
                .cloned())
        },
    )
    .await
    .unwrap();
    assert_eq!(
        github.comments(REPO, 11).len(),
        1,
        "one comment, however many runs"
    );
    assert_eq!(
        github.count("POST", "/issues/11/comments"),
        1,
        "created once"
    );
    assert!(
        github.count("PATCH", "/issues/comments/") >= 2,
        "then updated in place"
    );
    let body = comment.1;
    assert!(body.contains("<!-- slimci:summary -->"));
    assert!(body.contains("6 built"), "{body}");
    assert!(body.contains("deferred to production"), "{body}");
    assert!(
        body.contains("Compared against production state: deploy run"),
        "{body}"
    );
    // The failed round's comment named the failing test; find it among what was sent.
    let failing_round_reported = github.requests().iter().any(|request| {
        request.body["body"]
            .as_str()
            .is_some_and(|text| text.contains("accepted_values_stg_orders_status"))
    });
    assert!(
        failing_round_reported,
        "the failed run's comment listed its failing test"
    );
    // Every repository call used an installation token, never the app JWT.
    assert!(github.count("POST", "/app/installations/77/access_tokens") >= 1);
    for request in github
        .requests()
        .iter()
        .filter(|request| request.path.contains("/statuses/"))
    {
        assert!(
            request
                .authorization
                .as_deref()
                .unwrap_or_default()
                .starts_with("Bearer ghs_"),
            "{request:?}"
        );
    }
    // The 502s and the rate limit were retried; every commit ended with a final status.
    for sha in &shas {
        assert_ne!(github.statuses(sha).last().unwrap()["state"], "pending");
    }
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_pr_drops_its_isolation_and_the_sweeper_drops_what_a_missed_close_left() {
    use lapin::options::BasicPublishOptions;
    let github = FakeGitHub::start().await;
    let mut cluster = github_cluster(
        &github,
        1,
        1,
        "[sweeper]\ninterval_secs = 1\nmax_age_secs = 1\n",
    )
    .await;
    deploy_by_push(&mut cluster).await;

    // PR 30: built, then closed with a webhook.
    github.set_pull_state(REPO, 30, "open");
    let sha = cluster
        .origin
        .pull_request(30, &[edits::ADD_COLUMN])
        .unwrap();
    let (_, answer) = open_pr(&cluster, "opened", 30, &sha, false).await;
    cluster
        .wait_for_run(run_of(&answer), RUN_TIMEOUT)
        .await
        .unwrap();
    assert!(cluster.pr_database(30).is_file());
    github.set_pull_state(REPO, 30, "closed");
    let (status, closed) = open_pr(&cluster, "closed", 30, &sha, false).await;
    assert_eq!(status, 201, "{closed}");
    let teardown = cluster
        .wait_for_run(run_of(&closed), RUN_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(teardown.status, RunStatus::Success, "{teardown:?}");
    assert_eq!(teardown.kind, RunKind::Teardown);
    assert!(
        !cluster.pr_database(30).exists(),
        "PR 30's database is gone"
    );
    let log = cluster.log(teardown.id).await.unwrap();
    assert!(
        log.contains("slimci: dropped 6 relations of pr_shop_30"),
        "dropped through dbt:\n{log}"
    );
    assert!(
        cluster.production_database().is_file(),
        "production is untouched"
    );

    // A forged teardown of something that is not this repository's PR isolation is refused.
    let victim = cluster.warehouse().join("shop/pr/pr_other_1.duckdb");
    std::fs::write(&victim, b"not yours").unwrap();
    let forged = json!({
        "protocol": 1, "type": "job", "run_id": uuid::Uuid::now_v7(), "attempt": 1, "kind": "teardown",
        "repository": "shop", "clone_url": cluster.origin.path, "project_dir": "",
        "git": { "sha": null, "fetch_ref": "refs/heads/main" }, "pr_number": 1, "isolation": "pr_other_1",
        "production_state": null, "timeout_secs": 60
    });
    let connection = lapin::Connection::connect(
        slimci_tests::AMQP_URL,
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_publish(
            "".into(),
            format!("{}.jobs", cluster.prefix).as_str().into(),
            BasicPublishOptions::default(),
            forged.to_string().as_bytes(),
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_for(
        "the forged teardown to be dead-lettered",
        Duration::from_secs(30),
        || async { Ok((cluster.queue_depth("jobs.dead").await? == 1).then_some(())) },
    )
    .await
    .unwrap();
    let _ = connection.close(200, "bye".into()).await;
    assert_eq!(std::fs::read(&victim).unwrap(), b"not yours");
    let agent_log = std::fs::read_to_string(&cluster.agents[0].log).unwrap();
    assert!(agent_log.contains("refusing `pr_other_1`"), "{agent_log}");

    // PR 31: built, then closed on GitHub without the webhook reaching us.
    github.set_pull_state(REPO, 31, "open");
    let sha = cluster
        .origin
        .pull_request(31, &[edits::ADD_COLUMN])
        .unwrap();
    let (_, answer) = open_pr(&cluster, "opened", 31, &sha, false).await;
    cluster
        .wait_for_run(run_of(&answer), RUN_TIMEOUT)
        .await
        .unwrap();
    assert!(cluster.pr_database(31).is_file());
    github.set_pull_state(REPO, 31, "closed");
    wait_for(
        "the sweeper to drop PR 31's database",
        Duration::from_secs(120),
        || async { Ok((!cluster.pr_database(31).exists()).then_some(())) },
    )
    .await
    .unwrap();
    let coordinator_log = std::fs::read_to_string(&cluster.coordinator.log).unwrap();
    assert!(
        coordinator_log.contains("sweeper: dropping a left-behind PR isolation"),
        "{coordinator_log}"
    );
    assert!(coordinator_log.contains("pr_shop_31"), "{coordinator_log}");
    cluster.assert_all_alive();
}
