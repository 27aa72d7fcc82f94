//! `Services`: what every job on this agent shares (configuration, caches, the warehouse, the
//! sandbox, the coordinator client, the pre-started dbt pool).

use std::sync::Arc;

use crate::cache::Cache;
use crate::config::{Config, Secrets};
use crate::coordinator_client::CoordinatorClient;
use crate::git::GitCache;
use crate::job::guard::GuardScript;
use crate::sandbox::Sandbox;
use crate::state::StateCache;
use crate::warehouse::Warehouse;
use crate::warm::WarmPool;

/// What every job on this agent shares.
pub struct Services {
    pub config: Arc<Config>,
    pub secrets: Secrets,
    /// Claims, heartbeats, uploads and manifest downloads.
    pub coordinator: CoordinatorClient,
    pub git: Arc<GitCache>,
    pub states: StateCache,
    /// The disk caches, for holds and eviction.
    pub cache: Arc<Cache>,
    /// The installed dbt's identity, part of every parse and packages key.
    pub dbt_identity: String,
    pub warehouse: Arc<Warehouse>,
    pub sandbox: Arc<Sandbox>,
    /// Pre-started dbt for the slots' next builds, when dbt is a Python script here.
    pub warm: Option<Arc<WarmPool>>,
    /// The write guard's script, when dbt is a Python script here.
    pub guard_script: Option<GuardScript>,
    /// OTLP export; a tracer when traces are exported (`crate::trace`).
    pub telemetry: Arc<slimci_telemetry::Telemetry>,
}
