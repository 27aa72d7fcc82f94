//! The slimci agent: takes jobs from RabbitMQ (prefetch = slots), claims each with the
//! coordinator, checks out the exact commit, runs dbt, streams logs and results back, and
//! uploads artifacts.
//!
//! This file starts the agent (`run`): caches, sandbox, pre-started dbt, then the job
//! consumer (`consumer`), the heartbeat loop (`lease`) and the control listener (`control`),
//! which share the attempts it holds (`held_attempts`) and decide by `rules`. `job` runs one
//! attempt through its phases using `git`, `state`, `warehouse` and `process`; every call to
//! the coordinator goes through `coordinator_client`.

pub mod cache;
pub mod config;
pub mod consumer;
pub mod control;
pub mod coordinator_client;
pub mod dbtlog;
pub mod events;
pub mod git;
pub mod held_attempts;
pub mod job;
pub mod lease;
pub mod process;
pub mod redact;
pub mod reuse;
pub mod rules;
pub mod sandbox;
pub mod state;
pub mod trace;
pub mod warehouse;
pub mod warm;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use slimci_proto::Topology;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, WarehouseConfig};
use crate::consumer::Worker;
use crate::control::ControlListener;
use crate::coordinator_client::CoordinatorClient;
use crate::held_attempts::HeldAttempts;
use crate::job::Services;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create {path}: {source}")]
    WorkDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error(transparent)]
    Telemetry(#[from] slimci_telemetry::TelemetryError),
}

/// How the agent stops.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Stop taking jobs; finish the running ones.
    pub drain: CancellationToken,
    /// Cancel the running ones too.
    pub abort: CancellationToken,
}

/// Opens the disk caches, moves the ones of earlier versions (`<work_dir>/git`, `/state`) into
/// them, and brings them within their size limit.
fn open_cache(config: &Config) -> Result<cache::Cache, AgentError> {
    let cache = cache::Cache::new(config.cache_dir(), config.cache.max_bytes);
    for kind in cache::KINDS {
        let directory = cache.kind_dir(kind).map_err(|source| AgentError::WorkDir {
            path: cache.root().join(kind),
            source,
        })?;
        let old = config.work_dir.join(kind);
        if matches!(kind, "git" | "state") && old.is_dir() && old != directory {
            // Git caches move (a refetch would be slow); old locks and manifests just go.
            if kind == "git"
                && let Ok(entries) = std::fs::read_dir(&old)
            {
                for entry in entries.filter_map(Result::ok) {
                    let name = entry.file_name();
                    if name.to_string_lossy().ends_with(".git") && !directory.join(&name).exists() {
                        let _ = std::fs::rename(entry.path(), directory.join(&name));
                    }
                }
            }
            if let Err(error) = std::fs::remove_dir_all(&old) {
                tracing::warn!(%error, dir = %old.display(), "could not remove an old cache directory");
            }
        }
    }
    let unproven = reuse::remove_unproven(&cache);
    if !unproven.is_empty() {
        tracing::info!(removed = ?unproven, "cache: removed parses and packages no deploy wrote (saved by an older agent)");
    }
    let evicted = cache.evict();
    tracing::info!(
        total_bytes = evicted.total_bytes,
        removed = evicted.removed.len(),
        "cache size checked"
    );
    Ok(cache)
}

/// Runs the agent until `shutdown.drain` fires and the running jobs are done.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), AgentError> {
    let secrets = config.secrets()?;
    std::fs::create_dir_all(&config.work_dir).map_err(|source| AgentError::WorkDir {
        path: config.work_dir.clone(),
        source,
    })?;
    let warehouse = match config.warehouse.clone() {
        WarehouseConfig::Duckdb {
            root,
            threads,
            keep_deploys,
            ..
        } => {
            std::fs::create_dir_all(&root).map_err(|source| AgentError::WorkDir {
                path: root.clone(),
                source,
            })?;
            warehouse::Warehouse::DuckDb(warehouse::DuckDbWarehouse {
                root,
                threads,
                keep_deploys,
                // Each secret with a DuckDB setting reaches the profile as an `env_var`
                // reference.
                secret_settings: secrets
                    .warehouse
                    .iter()
                    .filter_map(|secret| Some((secret.setting.clone()?, secret.env_name())))
                    .collect(),
            })
        }
        WarehouseConfig::Postgres {
            host,
            port,
            user,
            sslmode,
            threads,
            ..
        } => warehouse::Warehouse::Postgres(warehouse::PostgresWarehouse {
            host,
            port,
            user,
            sslmode,
            threads,
        }),
        WarehouseConfig::Snowflake {
            account,
            user,
            role,
            warehouse,
            private_key_path,
            private_key_passphrase,
            private_key_passphrase_file,
            threads,
            host,
            port,
            protocol,
            ..
        } => warehouse::Warehouse::Snowflake(warehouse::SnowflakeWarehouse {
            account,
            user,
            role,
            warehouse,
            auth: if private_key_path.is_some() {
                warehouse::SnowflakeAuth::KeyPair {
                    passphrase: private_key_passphrase.is_some()
                        || private_key_passphrase_file.is_some(),
                }
            } else {
                warehouse::SnowflakeAuth::Password
            },
            threads,
            host,
            port,
            protocol,
        }),
    };
    // Run directories belong to the build user; their parent only needs to be searchable.
    let runs = config.work_dir.join("runs");
    std::fs::create_dir_all(&runs)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&runs, std::fs::Permissions::from_mode(0o711))
        })
        .map_err(|source| AgentError::WorkDir {
            path: runs.clone(),
            source,
        })?;
    let config_path = config
        .source
        .clone()
        .unwrap_or_else(|| PathBuf::from("/etc/slimci/agent.toml"));
    let sandbox = sandbox::Sandbox::new(&config, &config_path)?;
    for warning in &sandbox.warnings {
        tracing::warn!("sandbox: {warning}");
    }
    tracing::info!(
        cgroup = sandbox.cgroup_version(),
        user = sandbox
            .user()
            .map_or("(the agent's own)", |user| user.name.as_str()),
        required = config.sandbox.required,
        "sandbox ready"
    );
    let topology = Topology::new(&config.amqp.prefix);
    let telemetry = Arc::new(slimci_telemetry::Telemetry::start(
        &config.telemetry,
        "slimci-agent",
    )?);
    let events_give_up = CancellationToken::new();
    let (events, events_task) = events::start(
        config.name.clone(),
        secrets.amqp_url.clone(),
        topology.clone(),
        events_give_up.clone(),
    );
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("slimci-agent/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let cache = Arc::new(open_cache(&config)?);
    // What a pre-started dbt may touch before it knows its build: any build's paths.
    let warm = if config.prestart_dbt {
        let paths = sandbox::BuildPaths {
            write: std::iter::once(runs.clone())
                .chain(config.warehouse.duckdb_root().map(Path::to_owned))
                .collect(),
            read: vec![cache.root().join("state")],
        };
        match warm::WarmPool::new(
            &config.dbt,
            &config.work_dir,
            paths,
            Duration::from_secs(config.grace_secs()),
            usize::from(config.slots),
        ) {
            Ok(pool) => pool.map(Arc::new),
            Err(error) => {
                tracing::warn!(%error, "cannot prepare pre-started dbt; builds start it cold");
                None
            }
        }
    } else {
        None
    };
    let guard_script = match warm::script_python(&config.dbt) {
        Some(python) => {
            match job::guard::GuardScript::install(python, &config.work_dir.join("dbt-worker")) {
                Ok(script) => Some(script),
                Err(error) => {
                    tracing::warn!(%error, "cannot write the write guard's script; CI builds run without it");
                    None
                }
            }
        }
        None => {
            tracing::warn!(dbt = %config.dbt.display(), "dbt is not a Python script here; CI builds run without the write guard");
            None
        }
    };
    let dbt_identity = reuse::dbt_identity(&config.dbt);
    tracing::info!(dir = %cache.root().display(), max_bytes = config.cache.max_bytes, dbt = %dbt_identity, "caches ready");
    let coordinator = CoordinatorClient::new(
        http,
        &config.coordinator.url,
        secrets.coordinator_token.clone(),
        config.name.clone(),
    );
    let config = Arc::new(config);
    let held = Arc::new(HeldAttempts::default());
    let worker = Arc::new(Worker {
        services: Services {
            git: Arc::new(git::GitCache::new(
                cache.root().join("git"),
                secrets.git_https_token.clone(),
            )),
            states: state::StateCache::new(cache.clone()),
            cache,
            dbt_identity,
            warehouse: Arc::new(warehouse),
            guard_script,
            config: config.clone(),
            secrets: secrets.clone(),
            coordinator: coordinator.clone(),
            sandbox: Arc::new(sandbox),
            warm,
            telemetry: telemetry.clone(),
        },
        events,
        topology,
        held: held.clone(),
        slots: Arc::new(Semaphore::new(usize::from(config.slots))),
        abort: shutdown.abort.clone(),
    });
    tracing::info!(agent = %config.name, slots = config.slots, "agent starting");
    if let Some(pool) = &worker.services.warm {
        let (pool, sandbox) = (pool.clone(), worker.services.sandbox.clone());
        tokio::spawn(async move { pool.replenish(&sandbox).await });
    }

    let jobs = TaskTracker::new();
    let control = tokio::spawn(control::control_loop(
        ControlListener {
            agent: config.name.clone(),
            amqp_url: secrets.amqp_url.clone(),
            topology: worker.topology.clone(),
            held: held.clone(),
        },
        shutdown.drain.clone(),
    ));
    let presence = lease::Presence {
        slots: config.slots,
        draining: shutdown.drain.clone(),
    };
    let heartbeats = tokio::spawn(lease::heartbeat_loop(held, coordinator, presence.clone()));
    if worker
        .services
        .coordinator
        .wait_until_answering(presence.status(0), &shutdown.drain)
        .await
    {
        consumer::consume_loop(&worker, &secrets.amqp_url, &jobs, &shutdown.drain).await;
    }
    jobs.close();
    // Said before the wait, so that the log shows what a stop is waiting for.
    tracing::info!(
        running = jobs.len(),
        "no longer taking jobs; waiting for running ones"
    );
    let drain_timeout = Duration::from_secs(config.drain_timeout_secs);
    if tokio::time::timeout(drain_timeout, jobs.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_s = config.drain_timeout_secs,
            "running jobs outlasted the drain timeout; releasing them to be retried elsewhere"
        );
        shutdown.abort.cancel();
    }
    jobs.wait().await;
    if let Some(pool) = &worker.services.warm {
        pool.close().await;
    }
    control.abort();
    heartbeats.abort();
    drop(worker);
    // Running jobs are done; give the last events a bounded time to reach the broker.
    let flush = tokio::time::timeout(Duration::from_secs(30), events_task);
    if flush.await.is_err() {
        events_give_up.cancel();
    }
    // The last spans go out too.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    Ok(())
}
