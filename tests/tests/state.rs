//! Production state from wherever production runs: a repository with `deploys = false` gets
//! its production state only from manifests published with `slimci state publish`. Real
//! coordinator, agent, RabbitMQ and git; the manifests come from a real `dbt parse` of the
//! repository's commits.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use slimci_client::{ClientError, RunStatus};
use slimci_proto::RunKind;
use slimci_tests::{Cluster, ClusterOptions, ci_request, deploy_request, edits, origin};

/// Small enough that a test can send more, large enough for the shop project's manifest.
const MAX_ARTIFACT_BYTES: usize = 2 * 1024 * 1024;

fn deploys_off() -> ClusterOptions {
    ClusterOptions {
        repository_toml: "deploys = false".to_owned(),
        coordinator_toml: format!("[limits]\nmax_artifact_bytes = {MAX_ARTIFACT_BYTES}\n"),
        ..Default::default()
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn refusal<T: std::fmt::Debug>(result: Result<T, ClientError>) -> (StatusCode, String) {
    match result.expect_err("the call was refused") {
        ClientError::Refused { status, message } => (status, message),
        other => panic!("not a refusal: {other:#}"),
    }
}

/// `dbt parse` of the origin's commit `sha` in a clone of its own, with a DuckDB profile
/// pointing at a file under `dir`, as a team's own production job would run it; returns the
/// path of the `manifest.json` it wrote.
async fn parse_manifest(cluster: &Cluster, sha: &str, dir: &Path) -> PathBuf {
    let checkout = dir.join("checkout");
    origin::git(
        cluster.dir.path(),
        &[
            "clone",
            "-q",
            &cluster.origin.path.display().to_string(),
            &checkout.display().to_string(),
        ],
    )
    .unwrap();
    origin::git(&checkout, &["checkout", "-q", sha]).unwrap();
    let profiles = dir.join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    std::fs::write(
        profiles.join("profiles.yml"),
        format!(
            "shop:\n  target: prod\n  outputs:\n    prod:\n      type: duckdb\n      path: {}\n      threads: 1\n",
            dir.join("prod.duckdb").display()
        ),
    )
    .unwrap();
    let mut command = tokio::process::Command::new(slimci_tests::dbt());
    command
        .args(["parse", "--project-dir"])
        .arg(&checkout)
        .arg("--profiles-dir")
        .arg(&profiles)
        .env("DO_NOT_TRACK", "1")
        .env("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
        .current_dir(&checkout)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("dbt parse ended within 60 s")
        .expect("run dbt parse");
    assert!(
        output.status.success(),
        "dbt parse failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    checkout.join("target/manifest.json")
}

/// A new commit of main (the PR edit, merged) and its manifest from `dbt parse`, made under
/// `dir`: production moving on.
async fn production_moves_on(cluster: &Cluster, dir: &Path) -> (String, Vec<u8>) {
    let sha = cluster
        .origin
        .commit_file_on_main(
            edits::FILE,
            &std::fs::read_to_string(cluster.origin.path.join(edits::FILE))
                .unwrap()
                .replacen(edits::ADD_COLUMN.1, edits::ADD_COLUMN.2, 1),
        )
        .unwrap();
    let manifest = parse_manifest(cluster, &sha, &dir.join("second")).await;
    (sha, std::fs::read(manifest).unwrap())
}

/// A raw publish, for bodies that are wrong on purpose: the status and the error message.
async fn publish_raw(
    cluster: &Cluster,
    repository: &str,
    query: &str,
    body: Vec<u8>,
) -> (u16, String) {
    let response = cluster
        .http
        .post(format!(
            "{}/api/v1/repositories/{repository}/production-state{query}",
            cluster.url
        ))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let answer: serde_json::Value = response.json().await.unwrap_or_default();
    (
        status,
        answer["error"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_deploys_off_deploys_and_bad_manifests_are_refused_saying_what_to_do() {
    let cluster = Cluster::start(ClusterOptions {
        agents: 0,
        ..deploys_off()
    })
    .await
    .unwrap();
    let sha = cluster.origin.main_sha().unwrap();

    // Day one: the advice names only the publish, since this repository has deploys off.
    let run = cluster.create_run(&ci_request(1, &sha)).await.unwrap();
    assert_eq!(run.status, RunStatus::Error);
    let advice = run.message.unwrap();
    assert!(
        advice.contains("slimci state publish --repo shop --sha <commit> target/manifest.json"),
        "{advice}"
    );
    assert!(!advice.contains("slimci deploy"), "{advice}");
    let shown = cluster.run_cli(&["state", "show", "--repo", "shop"]).await;
    assert_eq!(shown.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&shown.stderr);
    assert!(stderr.contains("has no production state yet"), "{stderr}");
    assert!(stderr.contains("HTTP 404"), "{stderr}");

    // A deploy, by API or CLI, is refused with where production state comes from instead.
    let (status, message) = refusal(cluster.client.create_run(&deploy_request()).await);
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        message.contains("deploys are off for repository `shop`")
            && message.contains("slimci state publish --repo shop"),
        "{message}"
    );
    let deploy = cluster.run_cli(&["deploy", "--repo", "shop"]).await;
    assert_eq!(deploy.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&deploy.stderr);
    assert!(stderr.contains("deploys are off"), "{stderr}");

    // Bodies that are not a manifest, and requests that name no usable commit or repository.
    let sha_query = format!("?sha={sha}");
    let run_results = br#"{"metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/run-results/v6.json"}, "results": []}"#;
    let mut oversized = b"{\"metadata\": {}, \"padding\": \"".to_vec();
    oversized.resize(MAX_ARTIFACT_BYTES + 1024, b'x');
    let cases: [(&str, &str, Vec<u8>, u16, &str); 7] = [
        (
            "shop",
            &sha_query,
            b"PK\x03\x04 a zip".to_vec(),
            400,
            "the body is not JSON",
        ),
        (
            "shop",
            &sha_query,
            run_results.to_vec(),
            400,
            "run-results/v6.json`, which is not a manifest's",
        ),
        (
            "shop",
            &sha_query,
            b"[]".to_vec(),
            400,
            "not a dbt manifest",
        ),
        (
            "shop",
            &sha_query,
            oversized,
            413,
            &format!("larger than the limit of {MAX_ARTIFACT_BYTES} bytes"),
        ),
        ("shop", "", b"{}".to_vec(), 400, "?sha=<40 hex digits>"),
        (
            "shop",
            "?sha=main",
            b"{}".to_vec(),
            400,
            "`main` is not a commit SHA",
        ),
        (
            "nope",
            &sha_query,
            b"{}".to_vec(),
            404,
            "unknown repository `nope`",
        ),
    ];
    for (repository, query, body, expected_status, expected_message) in cases {
        let (status, message) = publish_raw(&cluster, repository, query, body).await;
        assert_eq!(status, expected_status, "{repository}{query}: {message}");
        assert!(
            message.contains(expected_message),
            "{repository}{query}: {message}"
        );
    }
    // Nothing of the refused publishes was kept.
    assert_eq!(
        cluster.runs().await.unwrap().len(),
        1,
        "only the day-one run"
    );
    let artifacts = cluster.dir.path().join("coordinator/artifacts");
    let left = std::fs::read_dir(&artifacts).map_or(0, |entries| entries.count());
    assert_eq!(left, 0, "refused manifests left in {}", artifacts.display());
    let (status, _) = refusal(cluster.client.production_state("shop").await);
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_manifest_is_the_production_state_ci_runs_compare_against() {
    let mut cluster = Cluster::start(deploys_off()).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let first_sha = cluster.origin.main_sha().unwrap();
    let manifest = parse_manifest(&cluster, &first_sha, &work.path().join("first")).await;
    let manifest_sha256 = sha256(&std::fs::read(&manifest).unwrap());

    let published = cluster
        .run_cli(&[
            "state",
            "publish",
            "--repo",
            "shop",
            "--sha",
            &first_sha,
            &manifest.display().to_string(),
        ])
        .await;
    let stdout = String::from_utf8_lossy(&published.stdout);
    assert!(
        published.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&published.stderr)
    );
    assert!(
        stdout.contains("as the production state of shop"),
        "{stdout}"
    );
    assert!(stdout.contains(&first_sha), "{stdout}");
    assert!(stdout.contains(&manifest_sha256), "{stdout}");

    // The production state names a finished publish run whose artifact is those bytes.
    let production = cluster.production_state().await.unwrap();
    assert_eq!(production.sha, first_sha);
    assert_eq!(production.manifest_sha256, manifest_sha256);
    assert_eq!(production.run_kind, RunKind::Publish);
    let first = production.deploy_run_id;
    assert!(stdout.contains(&first.to_string()), "{stdout}");
    let run = cluster.run(first).await.unwrap();
    assert_eq!(
        (run.kind, run.status),
        (RunKind::Publish, RunStatus::Success)
    );
    assert_eq!(run.sha.as_deref(), Some(first_sha.as_str()));
    assert_eq!(
        cluster
            .client
            .artifact(first, "manifest.json")
            .await
            .unwrap(),
        std::fs::read(&manifest).unwrap()
    );
    let shown = cluster.run_cli(&["state", "show", "--repo", "shop"]).await;
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "production state of shop: published manifest {first}"
        )),
        "{stdout}"
    );

    // A PR's CI run is stamped with it, and its agent fetches that manifest. DuckDB's
    // production database only comes from a slimci deploy, so the build itself stops there,
    // saying so.
    let pr_sha = cluster
        .origin
        .pull_request(2, &[edits::ADD_COLUMN])
        .unwrap();
    let ci = cluster.create_run(&ci_request(2, &pr_sha)).await.unwrap();
    let ci = cluster
        .wait_for_run(ci.id, Duration::from_secs(120))
        .await
        .unwrap();
    let stamp = ci.production_state.clone().expect("stamped");
    assert_eq!(
        (stamp.deploy_run_id, stamp.sha.as_str()),
        (first, first_sha.as_str())
    );
    assert_eq!(stamp.manifest_sha256, manifest_sha256);
    let log = cluster.log(ci.id).await.unwrap();
    assert!(
        log.contains(&format!(
            "comparing against production state of deploy {first}"
        )),
        "{log}"
    );
    assert_eq!(ci.status, RunStatus::Error, "{ci:?}");
    let message = ci.message.clone().unwrap_or_default();
    assert!(
        message.contains("this runner has no production database for repository `shop`")
            && message.contains("slimci state publish"),
        "{ci:?}"
    );

    // Production moves on: a new commit of main, parsed and published through the API, is the
    // new production state; the CI run keeps the one it was stamped with.
    let (second_sha, bytes) = production_moves_on(&cluster, work.path()).await;
    let second_sha256 = sha256(&bytes);
    assert_ne!(second_sha256, manifest_sha256);
    let answer = cluster
        .client
        .publish_production_state("shop", &second_sha, bytes)
        .await
        .unwrap();
    assert_ne!(answer.deploy_run_id, first);
    assert_eq!(cluster.production_state().await.unwrap(), answer);
    assert_eq!(
        (answer.sha.as_str(), answer.manifest_sha256.as_str()),
        (second_sha.as_str(), second_sha256.as_str())
    );
    let ci = cluster.run(ci.id).await.unwrap();
    assert_eq!(ci.production_state.unwrap().deploy_run_id, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_from_dbt_cloud_is_the_manifest_of_the_production_jobs_latest_success() {
    use slimci_tests::dbt_cloud::{ERROR, FakeDbtCloud, FakeRun, SUCCESS};
    const PRODUCTION_JOB: u64 = 456;
    let cloud = FakeDbtCloud::start(9_001, "cloud-service-token").await;
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("dbt-cloud-token");
    std::fs::write(&token_file, "cloud-service-token\n").unwrap();
    let mut cluster = Cluster::start(ClusterOptions {
        repository_toml: format!(
            r#"deploys = false
production_source = "dbt_cloud"
[repository.dbt_cloud]
account_id = {account}
api_url = "{url}"
token_file = "{token_file}"
production_job_id = {PRODUCTION_JOB}
production_poll_secs = 1
"#,
            account = cloud.account_id,
            url = cloud.url,
            token_file = token_file.display(),
        ),
        ..deploys_off()
    })
    .await
    .unwrap();

    // The production job: a success of main's commit, then a newer failed run (never taken),
    // and runs of other jobs around them. dbt Cloud is rate limiting and failing at first.
    let first_sha = cluster.origin.main_sha().unwrap();
    let manifest =
        std::fs::read(parse_manifest(&cluster, &first_sha, &work.path().join("first")).await)
            .unwrap();
    for id in 100..130 {
        cloud.add_run(FakeRun::new(id, 999, SUCCESS));
    }
    cloud.fail_next(&[429, 500, 502]);
    cloud.add_run(
        FakeRun::new(1_001, PRODUCTION_JOB, SUCCESS)
            .with_sha(&first_sha)
            .with_artifact("manifest.json", manifest.clone()),
    );
    cloud.add_run(FakeRun::new(1_002, PRODUCTION_JOB, ERROR).with_sha(&first_sha));
    cloud.add_run(FakeRun::new(1_003, 999, SUCCESS));

    let production = slimci_tests::wait_for(
        "dbt Cloud's production run to be imported",
        Duration::from_secs(60),
        || async { Ok(cluster.production_state().await.ok()) },
    )
    .await
    .unwrap();
    assert_eq!(production.dbt_cloud_run_id, Some(1_001));
    assert_eq!(production.sha, first_sha);
    assert_eq!(production.run_kind, RunKind::Publish);
    assert_eq!(production.manifest_sha256, sha256(&manifest));
    let run = cluster.run(production.deploy_run_id).await.unwrap();
    assert_eq!(run.status, RunStatus::Success);
    assert!(
        run.message
            .as_deref()
            .unwrap_or_default()
            .starts_with("manifest.json of dbt Cloud run 1001 (production job 456)"),
        "{run:?}"
    );
    assert_eq!(
        cluster
            .client
            .artifact(production.deploy_run_id, "manifest.json")
            .await
            .unwrap(),
        manifest
    );

    // What dbt Cloud received: the token, and a question for the job's latest success; the
    // rate limit and the errors were asked again, not given up on or spun on.
    let requests = cloud.requests();
    assert!(requests.len() >= 5, "{requests:?}");
    assert!(
        requests
            .iter()
            .all(|request| request.authorization.as_deref() == Some("Token cloud-service-token")),
        "{requests:?}"
    );
    let asked = &requests[0];
    assert_eq!(
        asked.path,
        format!("/api/v2/accounts/{}/runs/", cloud.account_id)
    );
    assert_eq!(asked.query["job_definition_id"], "456");
    assert_eq!(asked.query["status"], "10");
    assert_eq!(asked.query["order_by"], "-id");
    assert!(
        requests
            .iter()
            .any(|request| request.path.ends_with("/runs/1001/artifacts/manifest.json"))
    );

    // A CI run compares against it.
    let pr_sha = cluster
        .origin
        .pull_request(2, &[edits::ADD_COLUMN])
        .unwrap();
    let ci = cluster.create_run(&ci_request(2, &pr_sha)).await.unwrap();
    assert_eq!(
        ci.production_state
            .as_ref()
            .map(|stamp| stamp.deploy_run_id),
        Some(production.deploy_run_id),
        "{ci:?}"
    );
    let ci = cluster
        .wait_for_run(ci.id, Duration::from_secs(120))
        .await
        .unwrap();
    let log = cluster.log(ci.id).await.unwrap();
    assert!(
        log.contains(&format!(
            "comparing against production state of deploy {}",
            production.deploy_run_id
        )),
        "{log}"
    );
    // Its page says which dbt Cloud run the production state came from.
    let page = cluster
        .http
        .get(format!("{}/runs/{}", cluster.url, ci.id))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("the manifest of dbt Cloud run 1001"),
        "{page}"
    );

    // Production moves on in dbt Cloud: the next success is imported once, and the import of
    // the older one is not repeated.
    let (second_sha, second) = production_moves_on(&cluster, work.path()).await;
    cloud.add_run(
        FakeRun::new(1_004, PRODUCTION_JOB, SUCCESS)
            .with_sha(&second_sha)
            .with_artifact("manifest.json", second.clone()),
    );
    let moved = slimci_tests::wait_for(
        "the newer success to be imported",
        Duration::from_secs(60),
        || async {
            let production = cluster.production_state().await?;
            Ok((production.dbt_cloud_run_id == Some(1_004)).then_some(production))
        },
    )
    .await
    .unwrap();
    assert_eq!(moved.sha, second_sha);
    assert_eq!(moved.manifest_sha256, sha256(&second));
    // Two more polls: nothing new.
    let polls = cloud.requests().len();
    slimci_tests::wait_for("two more polls", Duration::from_secs(30), || async {
        Ok((cloud.requests().len() >= polls + 2).then_some(()))
    })
    .await
    .unwrap();
    let publishes = cluster
        .runs()
        .await
        .unwrap()
        .into_iter()
        .filter(|run| run.kind == RunKind::Publish)
        .count();
    assert_eq!(publishes, 2, "each dbt Cloud run imported once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_from_a_dbt_cloud_environment_is_its_latest_success_of_any_job_there() {
    use slimci_tests::dbt_cloud::{FakeDbtCloud, FakeRun, SUCCESS};
    const ENVIRONMENT: u64 = 31;
    let cloud = FakeDbtCloud::start(9_001, "cloud-service-token").await;
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("dbt-cloud-token");
    std::fs::write(&token_file, "cloud-service-token").unwrap();
    let cluster = Cluster::start(ClusterOptions {
        repository_toml: format!(
            r#"deploys = false
production_source = "dbt_cloud"
[repository.dbt_cloud]
account_id = {account}
api_url = "{url}"
token_file = "{token_file}"
production_environment_id = {ENVIRONMENT}
production_poll_secs = 1
ci_job_id = 604
"#,
            account = cloud.account_id,
            url = cloud.url,
            token_file = token_file.display(),
        ),
        ..deploys_off()
    })
    .await
    .unwrap();
    let sha = cluster.origin.main_sha().unwrap();
    let manifest = |name: &str| {
        serde_json::to_vec(&serde_json::json!({
            "metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json", "project_name": name},
            "nodes": {"model.shop.orders": {}},
        }))
        .unwrap()
    };
    // Production's nightly job and its hourly one run in the environment; a newer success of
    // another environment (staging) is not production.
    cloud.add_run(
        FakeRun::new(2_001, 600, SUCCESS)
            .in_environment(ENVIRONMENT)
            .with_sha(&sha)
            .with_artifact("manifest.json", manifest("nightly")),
    );
    cloud.add_run(
        FakeRun::new(2_002, 601, SUCCESS)
            .in_environment(ENVIRONMENT)
            .with_sha(&sha)
            .with_artifact("manifest.json", manifest("hourly")),
    );
    cloud.add_run(
        FakeRun::new(2_003, 700, SUCCESS)
            .in_environment(99)
            .with_sha(&sha)
            .with_artifact("manifest.json", manifest("staging")),
    );
    // Newer successes in the environment that are pull requests' builds, not production: one
    // of dbt Cloud's own CI job (a PR's schema), one of the CI job slimci triggers.
    cloud.add_run(
        FakeRun::new(2_004, 602, SUCCESS)
            .in_environment(ENVIRONMENT)
            .with_sha(&sha)
            .with_trigger(serde_json::json!({
                "cause": "Triggered via GitHub pull request #7",
                "github_pull_request_id": 7,
                "schema_override": "dbt_cloud_pr_9001_7",
            }))
            .with_artifact("manifest.json", manifest("cloud-ci")),
    );
    cloud.add_run(
        FakeRun::new(2_005, 604, SUCCESS)
            .in_environment(ENVIRONMENT)
            .with_sha(&sha)
            .with_trigger(serde_json::json!({"cause": "slimci run"}))
            .with_artifact("manifest.json", manifest("slimci-ci")),
    );
    let production = slimci_tests::wait_for(
        "the environment's latest success to be imported",
        Duration::from_secs(60),
        || async { Ok(cluster.production_state().await.ok()) },
    )
    .await
    .unwrap();
    assert_eq!(production.dbt_cloud_run_id, Some(2_002));
    assert_eq!(production.manifest_sha256, sha256(&manifest("hourly")));
    let run = cluster.run(production.deploy_run_id).await.unwrap();
    assert!(
        run.message
            .as_deref()
            .unwrap_or_default()
            .starts_with("manifest.json of dbt Cloud run 2002 (production job 601)"),
        "{run:?}"
    );
    let asked = &cloud.requests()[0];
    assert_eq!(asked.query["environment_id"], "31");
    assert_eq!(asked.query["status"], "10");
    assert_eq!(asked.query["include_related"], "[\"trigger\"]");
}
