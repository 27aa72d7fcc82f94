//! A PostgreSQL warehouse, through the real agents, dbt-postgres and a PostgreSQL 15 server of
//! the test's own: a deploy builds production in `analytics.analytics`; PRs build in schemas of
//! their own (`pr_shop_<n>`, and `pr_shop_<n>_reporting` for a model with a custom schema) of
//! the same database, on two agents at once, reading every unchanged parent from production;
//! a teardown drops exactly one PR's schemas.

use std::collections::BTreeSet;
use std::time::Duration;

use slimci_client::{RunStatus, RunView};
use slimci_tests::postgres::Postgres;
use slimci_tests::{Cluster, ClusterOptions, ci_request, edits, nodes_of, phases_of};

const RUN_TIMEOUT: Duration = Duration::from_secs(240);
const DATABASE: &str = "analytics";
/// `edits::ADD_COLUMN` in SQL PostgreSQL knows (DuckDB's `dayname` it does not).
const ADD_COLUMN: (&str, &str, &str) = (
    edits::FILE,
    "        cast(order_date as date) as order_date,",
    "        cast(order_date as date) as order_date,\n        extract(dow from order_date) as order_day_of_week,",
);

fn strings(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

fn built_models(run: &RunView) -> BTreeSet<String> {
    nodes_of(run)
        .iter()
        .filter(|node| node.resource_type == "model")
        .map(|node| node.unique_id.rsplit('.').next().unwrap().to_owned())
        .collect()
}

async fn teardown(cluster: &mut Cluster, pr: u64) -> RunView {
    let submitted = cluster.client.teardown("shop", pr).await.unwrap();
    cluster
        .wait_for_success(submitted.run.id, RUN_TIMEOUT)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prs_build_in_schemas_of_their_own_on_postgres_and_read_the_rest_from_production() {
    let postgres = Postgres::start().await.unwrap();
    postgres.create_database(DATABASE).unwrap();
    let mut cluster = Cluster::start(ClusterOptions {
        agents: 2,
        warehouse: Some(postgres.agent_warehouse()),
        repository_toml: format!(
            "[repository.warehouse]\ndatabase = \"{DATABASE}\"\nschema = \"analytics\"\n"
        ),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    // A model with a custom schema: by dbt's default generate_schema_name it lands in
    // `<target schema>_reporting`.
    cluster
        .origin
        .commit_file_on_main(
            "models/marts/order_report.sql",
            "{{ config(schema='reporting', materialized='table') }}\nselect status, count(*) as orders from {{ ref('stg_orders') }} group by status\n",
        )
        .unwrap();

    let deploy = cluster.deploy().await.unwrap();
    assert_eq!(deploy.status, RunStatus::Success, "{deploy:?}");
    assert_eq!(
        postgres.schemas(DATABASE).unwrap(),
        strings(&["analytics", "analytics_reporting"])
    );
    let production = postgres.relations(DATABASE, "analytics").unwrap();
    assert!(
        production.contains("stg_orders") && production.contains("fct_orders"),
        "{production:?}"
    );
    let production_orders = postgres
        .query(DATABASE, "select count(*) from analytics.fct_orders")
        .unwrap();
    let log = cluster.log(deploy.id).await.unwrap();
    assert!(
        log.contains("building production into analytics.analytics"),
        "{log}"
    );
    // No parse for CI builds: each PR's schema is in its profile, so none would carry over.
    assert!(
        phases_of(&deploy)
            .iter()
            .all(|phase| phase.phase != "seed_parse"),
        "{deploy:?}"
    );

    // Two PRs at once, one on each agent.
    let first_sha = cluster.origin.pull_request(7, &[ADD_COLUMN]).unwrap();
    let second_sha = cluster
        .origin
        .pull_request(8, &[ADD_COLUMN, edits::RESPACE])
        .unwrap();
    let first = cluster
        .create_run(&ci_request(7, &first_sha))
        .await
        .unwrap();
    let second = cluster
        .create_run(&ci_request(8, &second_sha))
        .await
        .unwrap();
    let first = cluster.wait_for_run(first.id, RUN_TIMEOUT).await.unwrap();
    let second = cluster.wait_for_run(second.id, RUN_TIMEOUT).await.unwrap();
    for run in [&first, &second] {
        assert_eq!(run.status, RunStatus::Success, "{run:?}");
    }
    assert_ne!(first.agent, second.agent, "{first:?}\n{second:?}");
    // The profile step ended when dbt had connected; the build step followed it.
    let steps: Vec<(&str, Option<bool>)> = phases_of(&first)
        .iter()
        .map(|phase| (phase.phase.as_str(), phase.ok))
        .filter(|(phase, _)| ["profile", "build"].contains(phase))
        .collect();
    assert_eq!(
        steps,
        [("profile", Some(true)), ("build", Some(true))],
        "{first:?}"
    );

    // Each PR wrote its own schemas, only what it changed and what depends on it...
    assert_eq!(
        postgres.schemas(DATABASE).unwrap(),
        strings(&[
            "analytics",
            "analytics_reporting",
            "pr_shop_7",
            "pr_shop_7_reporting",
            "pr_shop_8",
            "pr_shop_8_reporting",
        ])
    );
    let built = built_models(&first);
    assert!(
        built.contains("stg_orders") && built.contains("order_report"),
        "{built:?}"
    );
    assert!(!built.contains("stg_customers"), "{built:?}");
    let mut in_pr_schemas = postgres.relations(DATABASE, "pr_shop_7").unwrap();
    in_pr_schemas.extend(postgres.relations(DATABASE, "pr_shop_7_reporting").unwrap());
    assert_eq!(in_pr_schemas, built);
    // ...with the PR's change, reading unchanged parents from production.
    assert_eq!(
        postgres
            .query(
                DATABASE,
                "select count(*) from information_schema.columns where table_schema = 'pr_shop_7' and table_name = 'stg_orders' and column_name = 'order_day_of_week'"
            )
            .unwrap(),
        "1"
    );
    assert!(
        first
            .deferred
            .contains(&"model.shop.stg_customers".to_owned()),
        "{first:?}"
    );
    assert_eq!(
        postgres
            .query(DATABASE, "select count(*) from pr_shop_7.fct_orders")
            .unwrap(),
        production_orders
    );
    // Production is as the deploy left it.
    assert_eq!(
        postgres
            .query(
                DATABASE,
                "select count(*) from information_schema.columns where table_schema = 'analytics' and table_name = 'stg_orders' and column_name = 'order_day_of_week'"
            )
            .unwrap(),
        "0"
    );
    let log = cluster.log(first.id).await.unwrap();
    assert!(
        log.contains("building into the PR's schemas analytics.pr_shop_7"),
        "{log}"
    );
    // Every session of the build says whose it is, and each node what the server answered.
    let server_log = postgres.log();
    assert!(
        server_log.contains(&format!("application_name=slimci {} shop pr 7", first.id)),
        "{server_log}"
    );
    let stg_orders = nodes_of(&first)
        .iter()
        .find(|node| node.unique_id == "model.shop.stg_orders")
        .unwrap();
    let response = stg_orders.adapter_response.as_ref().unwrap();
    assert_eq!(response["_message"], "CREATE VIEW", "{response:?}");

    // A teardown drops PR 7's schemas and nothing else; a second one finds nothing and succeeds.
    let dropped = teardown(&mut cluster, 7).await;
    let log = cluster.log(dropped.id).await.unwrap();
    assert!(
        log.contains("dropped 2 schemas of pr_shop_7 in analytics"),
        "{log}"
    );
    assert_eq!(
        postgres.schemas(DATABASE).unwrap(),
        strings(&[
            "analytics",
            "analytics_reporting",
            "pr_shop_8",
            "pr_shop_8_reporting",
        ])
    );
    teardown(&mut cluster, 7).await;
    assert_eq!(
        postgres.relations(DATABASE, "analytics").unwrap(),
        production
    );

    // A project whose generate_schema_name ignores the target schema would build the PR into
    // production: the write guard refuses it before anything runs.
    let sha = cluster
        .origin
        .pull_request(
            9,
            &[
                ADD_COLUMN,
                (
                    "macros/generate_schema_name.sql",
                    "",
                    "{% macro generate_schema_name(custom_schema_name, node) -%}analytics{%- endmacro %}\n",
                ),
            ],
        )
        .unwrap();
    let refused = cluster.create_run(&ci_request(9, &sha)).await.unwrap();
    let refused = cluster.wait_for_run(refused.id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(refused.status, RunStatus::Error, "{refused:?}");
    let message = refused.message.clone().unwrap();
    assert!(
        message.contains(
            "would be written outside this PR's schemas analytics.pr_shop_9 and analytics.pr_shop_9_*"
        ),
        "{message}"
    );
    assert!(
        message.contains("model.shop.stg_orders → analytics.analytics"),
        "{message}"
    );
    assert!(message.contains("generate_schema_name"), "{message}");
    assert!(!postgres.schemas(DATABASE).unwrap().contains("pr_shop_9"));

    // A custom schema whose full name PostgreSQL would cut at 63 bytes is refused too.
    let long = "a_custom_schema_name_long_enough_to_pass_the_limit_of_postgres";
    let sha = cluster
        .origin
        .pull_request(
            10,
            &[(
                "models/marts/long_schema.sql",
                "",
                &format!("{{{{ config(schema='{long}') }}}}\nselect 1 as one\n"),
            )],
        )
        .unwrap();
    let refused = cluster.create_run(&ci_request(10, &sha)).await.unwrap();
    let refused = cluster.wait_for_run(refused.id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(refused.status, RunStatus::Error, "{refused:?}");
    let message = refused.message.clone().unwrap();
    assert!(
        message.contains(&format!(
            "model.shop.long_schema → analytics.pr_shop_10_{long} (a schema name longer than 63 bytes"
        )),
        "{message}"
    );
    assert_eq!(
        postgres
            .query(
                DATABASE,
                "select count(*) from information_schema.columns where table_schema = 'analytics' and table_name = 'stg_orders' and column_name = 'order_day_of_week'"
            )
            .unwrap(),
        "0"
    );
    cluster.assert_all_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_the_run_at_the_profile_step_with_the_servers_words_and_the_settings_to_check()
 {
    let postgres = Postgres::start().await.unwrap();
    postgres.create_database(DATABASE).unwrap();
    let warehouse = postgres.agent_warehouse().replace(
        &format!("password = \"{}\"", slimci_tests::postgres::PASSWORD),
        "password = \"not-the-password\"",
    );
    let mut cluster = Cluster::start(ClusterOptions {
        warehouse: Some(warehouse),
        repository_toml: format!(
            "[repository.warehouse]\ndatabase = \"{DATABASE}\"\nschema = \"analytics\"\n"
        ),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let run = cluster
        .create_run(&slimci_tests::deploy_request())
        .await
        .unwrap();
    let run = cluster.wait_for_run(run.id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(run.status, RunStatus::Error, "{run:?}");
    let message = run.message.clone().unwrap();
    assert!(
        message.contains("password authentication failed for user \"slimci\""),
        "{message}"
    );
    assert!(
        message.starts_with("cannot connect to PostgreSQL: "),
        "{message}"
    );
    assert!(
        message.contains("check this agent's [warehouse] host, port, user, password"),
        "{message}"
    );
    // It failed at the profile step: the build step never started, nothing was parsed.
    let phases: Vec<(String, Option<bool>)> = phases_of(&run)
        .iter()
        .map(|phase| (phase.phase.clone(), phase.ok))
        .collect();
    assert_eq!(
        phases.last(),
        Some(&("profile".to_owned(), Some(false))),
        "{phases:?}"
    );
    assert!(
        !phases.iter().any(|(phase, _)| phase == "build"),
        "{phases:?}"
    );
    // The wrong password is a secret too: never in the log.
    let log = cluster.log(run.id).await.unwrap();
    assert!(!log.contains("not-the-password"), "{log}");
    cluster.assert_all_alive();
}
