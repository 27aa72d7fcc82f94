//! The slimci coordinator: takes build requests, decides what runs, queues jobs over RabbitMQ,
//! records every run and its events, stores logs and artifacts, and keeps each repository's
//! production state.
//!
//! Layers: `rules` holds the decisions (no I/O); `store`, `logs` and `artifacts` hold state;
//! `app` is the state every part shares; `runs` and `leases` act on runs; `api` (HTTP, with the
//! GitHub webhook), `web` (the pages, over `api`'s views and log stream), `queue` (AMQP) and
//! `github` (REST) are adapters that call them.

pub mod agents;
pub mod api;
pub mod app;
pub mod artifacts;
pub mod config;
pub mod dbt_cloud;
pub mod fleet;
pub mod github;
pub mod leases;
pub mod logs;
pub mod metrics;
pub mod publish;
pub mod queue;
pub mod rules;
pub mod runs;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod web;

use std::sync::Arc;

use slimci_proto::Topology;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::AppState;
use crate::config::{Config, ConfigError};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error(transparent)]
    Telemetry(#[from] slimci_telemetry::TelemetryError),
    #[error("cannot write {path}: {source}")]
    AddressFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Runs the coordinator until `shutdown` fires, then stops accepting requests, lets the
/// background tasks finish, and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), CoordinatorError> {
    let secrets = config.secrets()?;
    let store = Store::open(&config.data_dir).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| CoordinatorError::Listen {
            address: config.listen,
            source,
        })?;
    let address = listener.local_addr().map_err(CoordinatorError::Serve)?;
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{address}"))
        .trim_end_matches('/')
        .to_owned();
    let address_file = config.data_dir.join("http.addr");
    std::fs::write(&address_file, format!("{address}\n")).map_err(|source| {
        CoordinatorError::AddressFile {
            path: address_file.clone(),
            source,
        }
    })?;
    tracing::info!(%address, %public_url, active_runs = store.count_active().await?, "coordinator listening");

    let topology = Topology::new(&config.amqp.prefix);
    let telemetry = slimci_telemetry::Telemetry::start(&config.telemetry, "slimci-coordinator")?;
    let metrics_listener = match config.telemetry.metrics_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| CoordinatorError::Listen { address, source })?,
        ),
        None => None,
    };
    let (changes, _) = broadcast::channel(4096);
    let dbt_cloud = dbt_cloud::DbtCloud::from_config(&config)?;
    let state = Arc::new(AppState {
        logs: Arc::new(logs::LogStore::new(
            config.data_dir.join("logs"),
            config.limits.max_log_bytes,
        )),
        artifacts: artifacts::ArtifactStore::new(config.data_dir.join("artifacts")),
        config: Arc::new(config),
        secrets: secrets.clone(),
        store,
        changes,
        outbox: Arc::new(Notify::new()),
        public_url,
        shutdown: shutdown.clone(),
        submit_lock: tokio::sync::Mutex::new(()),
        dead_jobs: std::sync::Mutex::new(Vec::new()),
        fleet: fleet::Fleet::default(),
        agents: agents::Agents::default(),
        metrics: metrics::Metrics::new(),
        telemetry,
        dbt_cloud,
    });
    let _gauges = state
        .telemetry
        .meter()
        .map(|meter| metrics::export_to(&state, &meter));
    let extended = state
        .store
        .extend_all_leases(leases::lease_duration(&state))
        .await?;
    if extended > 0 {
        tracing::info!(
            running = extended,
            "gave every running attempt a full lease after the restart"
        );
    }

    let tasks = TaskTracker::new();
    tasks.spawn(queue::publisher_loop(
        state.clone(),
        secrets.amqp_url.clone(),
        topology.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(leases::reaper_loop(state.clone(), shutdown.clone()));
    tasks.spawn(dbt_cloud::production_loop(state.clone(), shutdown.clone()));
    tasks.spawn(dbt_cloud::overflow_loop(state.clone(), shutdown.clone()));
    tasks.spawn(telemetry::trace_end_loop(state.clone(), shutdown.clone()));
    if let Some(listener) = metrics_listener {
        tracing::info!(address = ?listener.local_addr().ok(), "serving /metrics without a token");
        let router = axum::Router::new()
            .route("/metrics", axum::routing::get(api::fleet::open_metrics))
            .with_state(state.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "the metrics listener failed");
            }
        });
    }
    tasks.spawn(queue::events_loop(
        state.clone(),
        secrets.amqp_url.clone(),
        topology,
        shutdown.clone(),
    ));
    if let (Some(github), Some(auth)) = (&state.config.github, &secrets.github_auth) {
        let client = Arc::new(github::GitHub::new(
            &github.api_url,
            auth.clone(),
            github.status_context.clone(),
        ));
        tracing::info!(api = %github.api_url, "reporting results to GitHub");
        tasks.spawn(github::notifier_loop(
            state.clone(),
            client.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(sweeper::sweeper_loop(
            state.clone(),
            Some(client),
            shutdown.clone(),
        ));
    } else {
        tasks.spawn(sweeper::sweeper_loop(state.clone(), None, shutdown.clone()));
    }
    tasks.close();

    let routes = api::router(state.clone()).merge(web::router(state.clone()));
    let served = axum::serve(listener, routes)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    shutdown.cancel();
    tasks.wait().await;
    // The last spans and metrics go out before the process ends.
    let flushing = state.clone();
    let _ = tokio::task::spawn_blocking(move || flushing.telemetry.shutdown()).await;
    served.map_err(CoordinatorError::Serve)
}
