//! The agent's caches, through the real agent, dbt and DuckDB: a second PR reuses the first
//! one's parse (dbt's own partial parsing, with a profile that is the same for every PR),
//! packages are restored by their files' hash instead of `dbt deps`, and what each run used is
//! recorded with the run.

use std::collections::BTreeSet;
use std::time::Duration;

use slimci_client::{RunStatus, RunView};
use slimci_proto::CacheReport;
use slimci_tests::{Cluster, ClusterOptions, ci_request, edits, nodes_of, sandbox_of};

const RUN_TIMEOUT: Duration = Duration::from_secs(240);

fn built_models(run: &RunView) -> BTreeSet<String> {
    nodes_of(run)
        .iter()
        .filter(|node| node.resource_type == "model")
        .map(|node| node.unique_id.clone())
        .collect()
}

/// The caches a run reports using.
fn caches(run: &RunView) -> &CacheReport {
    run.caches
        .as_ref()
        .unwrap_or_else(|| panic!("no caches in {run:?}"))
}

async fn ci(cluster: &mut Cluster, pr: u64, sha: &str) -> RunView {
    let run = cluster.create_run(&ci_request(pr, sha)).await.unwrap();
    let run = cluster.wait_for_run(run.id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(run.status, RunStatus::Success, "{run:?}");
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pr_reuses_the_parse_and_the_packages_of_the_first() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    // A local package, used by a model: without it installed, the project does not parse.
    let origin = &cluster.origin;
    std::fs::create_dir_all(origin.path.join("vendor/shop_utils/macros")).unwrap();
    origin
        .commit_file_on_main(
            "vendor/shop_utils/dbt_project.yml",
            "name: shop_utils\nversion: '1.0.0'\nconfig-version: 2\n",
        )
        .unwrap();
    origin
        .commit_file_on_main(
            "vendor/shop_utils/macros/twice.sql",
            "{% macro twice(x) %}({{ x }}) * 2{% endmacro %}\n",
        )
        .unwrap();
    origin
        .commit_file_on_main(
            "models/marts/uses_package.sql",
            "select {{ shop_utils.twice(2) }} as four\n",
        )
        .unwrap();
    origin
        .commit_file_on_main("packages.yml", "packages:\n  - local: vendor/shop_utils\n")
        .unwrap();

    let deploy = cluster.deploy().await.unwrap();
    assert_eq!(
        caches(&deploy).deps.as_deref(),
        Some("installed"),
        "{deploy:?}"
    );
    assert_eq!(caches(&deploy).parse.as_deref(), Some("full"), "{deploy:?}");

    let first_sha = cluster
        .origin
        .pull_request(1, &[edits::ADD_COLUMN])
        .unwrap();
    let first = ci(&mut cluster, 1, &first_sha).await;
    let used = caches(&first);
    assert_eq!(used.deps.as_deref(), Some("hit"), "{first:?}");
    assert_eq!(used.state.as_deref(), Some("downloaded"), "{first:?}");
    // The first CI run's profile differs from the deploy's: a full parse, and dbt says why.
    assert_eq!(used.parse.as_deref(), Some("full"), "{first:?}");
    assert!(
        used.parse_reason.as_deref().unwrap().contains("not found"),
        "{first:?}"
    );

    // Another PR, another database and another commit: the profile is the same, so dbt reuses
    // the first PR's parse and reparses only the changed file.
    let second_sha = cluster
        .origin
        .pull_request(2, &[edits::ADD_COLUMN, edits::RESPACE])
        .unwrap();
    let second = ci(&mut cluster, 2, &second_sha).await;
    let used = caches(&second);
    assert_eq!(used.parse.as_deref(), Some("partial"), "{second:?}");
    assert!(used.parse_reason.is_none(), "{second:?}");
    assert_eq!(used.deps.as_deref(), Some("hit"), "{second:?}");
    assert_eq!(used.state.as_deref(), Some("hit"), "{second:?}");
    assert_eq!(used.git.as_deref(), Some("fetched"), "{second:?}");
    // The build ran on the slot's pre-started dbt, confined to the build's own rules.
    assert!(sandbox_of(&second).prestarted, "{second:?}");
    assert_eq!(sandbox_of(&second).landlock, "full", "{second:?}");
    // The reused parse changes nothing about what is built.
    assert_eq!(built_models(&second), built_models(&first));
    assert_eq!(built_models(&second).len(), 6, "{second:?}");
    let log = cluster.log(second.id).await.unwrap();
    assert!(log.contains("reusing a saved parse"), "{log}");
    assert!(log.contains("packages restored from the cache"), "{log}");
    // Each PR wrote its own database, under its own directory.
    assert!(cluster.pr_database(1).is_file());
    assert!(cluster.pr_database(2).is_file());

    // A commit that changes the profile's inputs (here dbt_project.yml) gets a full parse:
    // a cached parse is never used for other inputs.
    let project = std::fs::read_to_string(cluster.origin.path.join("dbt_project.yml")).unwrap();
    let third_sha = cluster
        .origin
        .pull_request(
            3,
            &[
                edits::ADD_COLUMN,
                (
                    "dbt_project.yml",
                    project.lines().next().unwrap(),
                    &format!("{}\n# a comment", project.lines().next().unwrap()),
                ),
            ],
        )
        .unwrap();
    let third = ci(&mut cluster, 3, &third_sha).await;
    assert_eq!(caches(&third).parse.as_deref(), Some("full"), "{third:?}");

    // `slimci show` says what the run used.
    let output = cluster.run_cli(&["show", &second.id.to_string()]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("caches: git fetched, state hit, deps hit, partial parse"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_keeps_its_caches_within_their_size_limit() {
    // A limit far below one parse file: after each run, everything not in use is evicted.
    let mut cluster = Cluster::start(ClusterOptions {
        warehouse_extra: "[cache]\nmax_bytes = 1024\n".to_owned(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.deploy().await.unwrap();
    let sha = cluster
        .origin
        .pull_request(1, &[edits::ADD_COLUMN])
        .unwrap();
    let run = ci(&mut cluster, 1, &sha).await;
    assert_eq!(caches(&run).parse.as_deref(), Some("full"), "{run:?}");
    let cache = cluster.agent_work_dir(0).join("cache");
    slimci_tests::wait_for(
        "the agent to evict its caches",
        Duration::from_secs(30),
        || async {
            let size = slimci_tests::disk_usage(&cache);
            Ok((size <= 1024).then_some(()))
        },
    )
    .await
    .unwrap();
    // Evicted entries are fetched again and the build still succeeds.
    let sha = cluster
        .origin
        .pull_request(2, &[edits::ADD_COLUMN])
        .unwrap();
    let run = ci(&mut cluster, 2, &sha).await;
    let used = caches(&run);
    assert_eq!(used.state.as_deref(), Some("downloaded"), "{run:?}");
    assert_eq!(used.git.as_deref(), Some("fetched"), "{run:?}");
    assert_eq!(used.parse.as_deref(), Some("full"), "{run:?}");
}
