//! A Snowflake warehouse, through the real agent and dbt-snowflake against the `fakesnow`
//! emulator (`tests/fixtures/fakesnow`; what it proves and what it does not is in its README):
//! key-pair authentication, deploys into `ANALYTICS.ANALYTICS` (the second one merging an
//! incremental model), a PR build into its own schemas of `ANALYTICS_CI` deferring to
//! production, every session tagged with the run, and a teardown that drops exactly the PR's
//! schemas.

use std::collections::BTreeSet;
use std::time::Duration;

use slimci_client::{RunStatus, RunView};
use slimci_tests::snowflake::Fakesnow;
use slimci_tests::{Cluster, ClusterOptions, ci_request, edits, nodes_of};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

fn strings(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

async fn succeeded(cluster: &mut Cluster, run: RunView) -> RunView {
    cluster.wait_for_success(run.id, RUN_TIMEOUT).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prs_build_in_schemas_of_their_own_on_snowflake_tagged_with_their_run() {
    let snowflake = Fakesnow::start().await.unwrap();
    let key = snowflake.private_key().unwrap();
    let mut cluster = Cluster::start(ClusterOptions {
        warehouse: Some(snowflake.agent_warehouse(&key)),
        repository_toml: "[repository.warehouse]\ndatabase = \"ANALYTICS\"\nschema = \"ANALYTICS\"\nci_database = \"ANALYTICS_CI\"\n".to_owned(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let origin = &cluster.origin;
    origin
        .commit_file_on_main(
            "models/marts/order_report.sql",
            "{{ config(schema='reporting', materialized='table') }}\nselect status, count(*) as orders from {{ ref('stg_orders') }} group by status\n",
        )
        .unwrap();
    origin
        .commit_file_on_main(
            "models/marts/order_events.sql",
            "{{ config(materialized='incremental', unique_key='order_id') }}\nselect order_id, status, order_date from {{ ref('stg_orders') }}\n{% if is_incremental() %}where order_date >= (select max(order_date) from {{ this }}){% endif %}\n",
        )
        .unwrap();

    // Two deploys: the second merges into the incremental model.
    let first_deploy = cluster.deploy().await.unwrap();
    let deploy = cluster.deploy().await.unwrap();
    for run in [&first_deploy, &deploy] {
        assert_eq!(run.status, RunStatus::Success, "{run:?}");
    }
    let merged = cluster.log(deploy.id).await.unwrap();
    assert!(merged.contains("order_events"), "{merged}");
    assert_eq!(
        snowflake.schemas("ANALYTICS").unwrap(),
        strings(&["ANALYTICS", "ANALYTICS_REPORTING"])
    );
    let production_orders = snowflake
        .query("select count(*) from ANALYTICS.ANALYTICS.FCT_ORDERS")
        .unwrap();

    let sha = cluster
        .origin
        .pull_request(7, &[edits::ADD_COLUMN])
        .unwrap();
    let run = cluster.create_run(&ci_request(7, &sha)).await.unwrap();
    let run = succeeded(&mut cluster, run).await;
    assert_eq!(
        snowflake.schemas("ANALYTICS_CI").unwrap(),
        strings(&["PR_SHOP_7", "PR_SHOP_7_REPORTING"])
    );
    assert_eq!(
        snowflake
            .query("select count(*) from ANALYTICS_CI.PR_SHOP_7.FCT_ORDERS")
            .unwrap(),
        production_orders
    );
    assert!(
        run.deferred
            .contains(&"model.shop.stg_customers".to_owned()),
        "{run:?}"
    );
    let built: BTreeSet<&str> = nodes_of(&run)
        .iter()
        .filter(|node| node.resource_type == "model")
        .map(|node| node.unique_id.as_str())
        .collect();
    assert!(built.contains("model.shop.order_report"), "{built:?}");
    assert!(!built.contains("model.shop.stg_customers"), "{built:?}");
    // Every session of the build carried the run in its query tag.
    let log = snowflake.log();
    let tagged = [
        r#""app":"slimci""#.to_owned(),
        r#""pr":7"#.to_owned(),
        r#""repo":"shop""#.to_owned(),
        format!(r#""run_id":"{}""#, run.id),
        format!(r#""sha":"{sha}""#),
    ];
    let logins: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(&run.id.to_string()))
        .collect();
    assert!(!logins.is_empty(), "no session of {} in\n{log}", run.id);
    for login in &logins {
        assert!(
            tagged.iter().all(|part| login.contains(part.as_str())),
            "{tagged:?} in {login}"
        );
    }
    // The key never reaches the log.
    let run_log = cluster.log(run.id).await.unwrap();
    let key_text = std::fs::read_to_string(&key).unwrap();
    let key_line = key_text.lines().nth(1).unwrap();
    assert!(!run_log.contains(key_line), "{run_log}");

    // A teardown drops PR 7's schemas, and nothing of production.
    let submitted = cluster.client.teardown("shop", 7).await.unwrap();
    let teardown = cluster.run(submitted.run.id).await.unwrap();
    let teardown = succeeded(&mut cluster, teardown).await;
    let log = cluster.log(teardown.id).await.unwrap();
    assert!(log.contains("dropped 2 schemas of pr_shop_7"), "{log}");
    assert!(snowflake.schemas("ANALYTICS_CI").unwrap().is_empty());
    assert_eq!(
        snowflake.schemas("ANALYTICS").unwrap(),
        strings(&["ANALYTICS", "ANALYTICS_REPORTING"])
    );
    cluster.assert_all_alive();
}
