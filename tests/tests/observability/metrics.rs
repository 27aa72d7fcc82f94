//! `/metrics` and the agents registry: every series there at 0 before anything ran, the numbers
//! after three runs on two agents, and who may scrape (the API token, or the metrics listener).

use std::collections::{BTreeMap, BTreeSet};

use slimci_client::RunStatus;
use slimci_tests::{Cluster, ClusterOptions, free_port, wait_for};

use crate::{TIMEOUT, stub_options, stub_pull_request};

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
                assert!(
                    !name.ends_with("_total") || kind == "counter",
                    "a _total family is a counter: {line}"
                );
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

/// `GET <url>/metrics`, without a token.
async fn scrape(cluster: &Cluster, url: &str) -> Scrape {
    scrape_as(cluster, url, None).await
}

/// `GET <url>/metrics` presenting `bearer`; fails unless it answers 200 with the text format.
async fn scrape_as(cluster: &Cluster, url: &str, bearer: Option<&str>) -> Scrape {
    let response = metrics_request(cluster, url, bearer).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    Scrape::parse(&response.text().await.unwrap())
}

async fn metrics_request(cluster: &Cluster, url: &str, bearer: Option<&str>) -> reqwest::Response {
    let mut request = cluster.http.get(format!("{url}/metrics"));
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

const API_TOKEN: &str = "e2e-metrics-api-token-0123456789";

/// README "Observability": `/metrics` answers with the user API's token (or the agent token,
/// accepted on every user route), and without one only on `[telemetry] metrics_listen`, which
/// serves nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_want_the_api_token_except_on_the_metrics_listener() {
    let metrics_port = free_port().unwrap();
    let mut cluster = Cluster::start(ClusterOptions {
        api_token: Some(API_TOKEN.to_owned()),
        ..stub_options(
            0,
            format!("[telemetry]\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n"),
        )
    })
    .await
    .unwrap();
    let url = cluster.url.clone();
    for (what, bearer) in [("no token", None), ("a wrong token", Some("not-the-token"))] {
        let answer = metrics_request(&cluster, &url, bearer).await;
        assert_eq!(answer.status(), 401, "{what}");
        let body = answer.text().await.unwrap();
        assert!(!body.contains("slimci_"), "{what} got metrics: {body}");
    }
    let with_token = scrape_as(&cluster, &url, Some(API_TOKEN)).await;
    assert_eq!(with_token.value("slimci_slots"), 0.0);
    assert_eq!(
        with_token.value(r#"slimci_agents{state="idle"}"#),
        0.0,
        "no agent in this cluster"
    );
    let with_agent_token = scrape_as(&cluster, &url, Some(slimci_tests::AGENT_TOKEN)).await;
    assert_eq!(
        with_agent_token.samples.keys().collect::<Vec<_>>(),
        with_token.samples.keys().collect::<Vec<_>>()
    );

    // The metrics listener: the same series without a token, and nothing else.
    let listener = format!("http://127.0.0.1:{metrics_port}");
    let open = scrape(&cluster, &listener).await;
    assert_eq!(
        open.samples.keys().collect::<Vec<_>>(),
        with_token.samples.keys().collect::<Vec<_>>()
    );
    for path in ["/api/v1/runs", "/api/v1/agents", "/healthz", "/"] {
        let answer = cluster
            .http
            .get(format!("{listener}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 404, "{path} on the metrics listener");
    }
    // The token still guards the user API itself.
    let runs = cluster
        .http
        .get(format!("{url}/api/v1/runs"))
        .send()
        .await
        .unwrap();
    assert_eq!(runs.status(), 401);
    cluster.client.runs(None, None, 10).await.unwrap();
    cluster.assert_all_alive();
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
    cluster.wait_building(long.id, TIMEOUT).await.unwrap();

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
    // A second cancel while it stops (or refused, once it ended) is not another cancel.
    let _ = cluster.client.cancel(long.id).await;
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
