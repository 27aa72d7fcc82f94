//! Harness for the end-to-end tests: starts the real `slimci-coordinator` and `slimci-agent`
//! binaries against the RabbitMQ on 127.0.0.1:5672 (under a queue prefix of the test's own),
//! real dbt (`SLIMCI_DBT`, or the virtualenv `scripts/lib.sh` installs), and a git repository
//! of the example project made for the test. Each process logs to its own file in the test's
//! directory and dies with the test; a wait fails at once, naming the process, when one died.
//! Dropping the cluster kills every process group it started and deletes its queues.

pub mod api;
pub mod binaries;
pub mod broker;
pub mod browser;
pub mod cluster;
pub mod dbt_cloud;
pub mod github;
pub mod inspect;
pub mod measure;
pub mod origin;
pub mod otlp;
pub mod postgres;
pub mod process;
pub mod sandbox;
pub mod snowflake;
pub mod storm;
pub mod wait;

pub use api::{REPOSITORY, ci_request, deploy_request, nodes_of, phases_of, sandbox_of};
pub use binaries::{binary, dbt, python, reachable_copy, workspace_root};
pub use cluster::{Cluster, ClusterOptions, WEBHOOK_SECRET};
pub use inspect::{attempt_spans, disk_usage, dump_database, record_file};
pub use origin::{Origin, edits};
pub use process::{Process, last_line, tail};
pub use wait::wait_for;

/// A TCP port of 127.0.0.1 that was free a moment ago, for a server a test starts.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const AGENT_TOKEN: &str = "e2e-agent-token-0123456789";
