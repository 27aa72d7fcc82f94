//! `AppState`: what the coordinator's parts share (configuration, secrets, the stores, the
//! change broadcast, the publisher's wake-up) and the URLs it gives out. Every adapter (`api`,
//! `queue`, `github`, `webhook`) and every action (`runs`, `leases`) takes it; it depends on
//! none of them.

use std::sync::Arc;

use slimci_proto::RunId;
use tokio::sync::{Notify, broadcast};

use crate::agents::Agents;
use crate::artifacts::ArtifactStore;
use crate::config::{Config, Secrets};
use crate::fleet::Fleet;
use crate::logs::LogStore;
use crate::metrics::Metrics;
use crate::store::Store;

pub struct AppState {
    pub config: Arc<Config>,
    pub secrets: Secrets,
    pub store: Store,
    pub logs: Arc<LogStore>,
    pub artifacts: ArtifactStore,
    /// Fires with a run's id whenever anything about it changed (status, log, progress).
    pub changes: broadcast::Sender<RunId>,
    /// Wakes the publisher: a run is waiting in the outbox, or a cancel was requested.
    pub outbox: Arc<Notify>,
    /// The coordinator's URL as users reach it, without a trailing `/`.
    pub public_url: String,
    /// Runs given up as poison; the publisher copies their jobs to the dead-letter queue.
    pub dead_jobs: std::sync::Mutex<Vec<(RunId, String)>>,
    /// Serialises run submissions (supersede and dedupe decisions read then write).
    pub submit_lock: tokio::sync::Mutex<()>,
    /// Fires at shutdown; open log streams end so the server can stop.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// How many agents consume the jobs queue, as RabbitMQ last said.
    pub fleet: Fleet,
    /// Every agent as it last said of itself (heartbeats, claims).
    pub agents: Agents,
    /// Counters and histograms for `/metrics` and OTLP.
    pub metrics: Metrics,
    /// OTLP export: a tracer when traces are exported (`crate::telemetry`).
    pub telemetry: slimci_telemetry::Telemetry,
    /// The dbt Cloud accounts of the repositories that have one.
    pub dbt_cloud: crate::dbt_cloud::DbtCloud,
}

impl AppState {
    /// Where users see run `id`.
    pub fn run_url(&self, id: RunId) -> String {
        slimci_client::run_url(&self.public_url, id)
    }

    /// Where users read run `id`'s log.
    pub fn run_logs_url(&self, id: RunId) -> String {
        slimci_client::run_logs_url(&self.public_url, id)
    }

    /// Where users and agents download artifact `name` of run `id`.
    pub fn artifact_url(&self, id: RunId, name: &str) -> String {
        slimci_client::artifact_url(&self.public_url, id, name)
    }
}
