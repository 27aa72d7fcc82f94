//! What an operator sees of the fleet, end to end: `/metrics` scraped and parsed and checked
//! against what the test did, and who may scrape it (`metrics.rs`); the agents registry
//! (`GET /api/v1/agents`, `slimci agents`); the traces of runs received by an OTLP receiver
//! inside the test (`slimci_tests::otlp`, over HTTP and over gRPC), decoded with
//! `opentelemetry-proto`: one trace per run across coordinator, RabbitMQ and agent, with a span
//! per dbt node, and a retried attempt in the same trace (`traces.rs`); and the traces of the
//! work that is not a build: the sweeper's teardowns and published manifests
//! (`teardowns_and_publishes.rs`).

mod metrics;
mod teardowns_and_publishes;
mod traces;

use std::time::Duration;

use slimci_client::RunRequest;
use slimci_tests::{Cluster, ClusterOptions, binary, ci_request, workspace_root};

const TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) fn stub_options(agents: usize, coordinator_toml: String) -> ClusterOptions {
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
pub(crate) fn stub_pull_request(cluster: &Cluster, pr: u64, from: &str, to: &str) -> RunRequest {
    let sha = cluster
        .origin
        .pull_request(pr, &[("slimci_stub.json", from, to)])
        .unwrap();
    ci_request(pr, &sha)
}
