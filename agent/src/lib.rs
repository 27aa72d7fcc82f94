//! The slimci agent: takes jobs from RabbitMQ (prefetch = slots), claims each with the
//! coordinator, checks out the exact commit, runs dbt, streams logs and results back, and
//! uploads artifacts.
//!
//! Layers: `worker` (this file) speaks AMQP and HTTP to the coordinator; `job` runs one
//! attempt through its phases using `git`, `state`, `warehouse` and `process`.

pub mod config;
pub mod dbtlog;
pub mod events;
pub mod git;
pub mod job;
pub mod process;
pub mod redact;
pub mod sandbox;
pub mod state;
pub mod warehouse;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use slimci_broker::{BrokerError, ConfirmedPublisher};
use slimci_proto::{
    ClaimRequest, ClaimResponse, ControlMessage, EventBody, Job, RunId, ToAgentMessage, Topology,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, WarehouseConfig};
use crate::events::Events;
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
}

/// How the agent stops.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Stop taking jobs; finish the running ones.
    pub drain: CancellationToken,
    /// Cancel the running ones too.
    pub abort: CancellationToken,
}

type Running = Arc<Mutex<HashMap<RunId, CancellationToken>>>;

struct Worker {
    services: Services,
    events: Events,
    topology: Topology,
    running: Running,
    abort: CancellationToken,
}

/// Runs the agent until `shutdown.drain` fires and the running jobs are done.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), AgentError> {
    let secrets = config.secrets()?;
    std::fs::create_dir_all(&config.work_dir).map_err(|source| AgentError::WorkDir {
        path: config.work_dir.clone(),
        source,
    })?;
    let WarehouseConfig::Duckdb {
        root,
        threads,
        keep_deploys,
        ..
    } = config.warehouse.clone();
    // Each secret with a DuckDB setting reaches the profile as an `env_var` reference.
    let secret_settings: Vec<(String, String)> = secrets
        .warehouse
        .iter()
        .filter_map(|secret| Some((secret.setting.clone()?, secret.env_name())))
        .collect();
    std::fs::create_dir_all(&root).map_err(|source| AgentError::WorkDir {
        path: root.clone(),
        source,
    })?;
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
    let config = Arc::new(config);
    let worker = Arc::new(Worker {
        services: Services {
            git: Arc::new(git::GitCache::new(
                config.work_dir.join("git"),
                secrets.git_https_token.clone(),
            )),
            states: state::StateCache::new(config.work_dir.join("state")),
            warehouse: Arc::new(warehouse::DuckDbWarehouse {
                root,
                threads,
                keep_deploys,
                secret_settings,
            }),
            config: config.clone(),
            secrets: secrets.clone(),
            http,
            sandbox: Arc::new(sandbox),
        },
        events,
        topology,
        running: Arc::default(),
        abort: shutdown.abort.clone(),
    });
    tracing::info!(agent = %config.name, slots = config.slots, "agent starting");

    let jobs = TaskTracker::new();
    let control = tokio::spawn(control_loop(
        worker.clone(),
        secrets.amqp_url.clone(),
        shutdown.drain.clone(),
    ));
    consume_loop(&worker, &secrets.amqp_url, &jobs, &shutdown.drain).await;
    jobs.close();
    tracing::info!(
        running = jobs.len(),
        "no longer taking jobs; waiting for running ones"
    );
    jobs.wait().await;
    control.abort();
    drop(worker);
    // Running jobs are done; give the last events a bounded time to reach the broker.
    let flush = tokio::time::timeout(Duration::from_secs(30), events_task);
    if flush.await.is_err() {
        events_give_up.cancel();
    }
    Ok(())
}

async fn consume_loop(
    worker: &Arc<Worker>,
    amqp_url: &str,
    jobs: &TaskTracker,
    drain: &CancellationToken,
) {
    slimci_broker::keep_connected("job consumer", drain, || {
        consume_session(worker, amqp_url, jobs, drain)
    })
    .await;
}

async fn consume_session(
    worker: &Arc<Worker>,
    amqp_url: &str,
    jobs: &TaskTracker,
    drain: &CancellationToken,
) -> Result<(), BrokerError> {
    let config = &worker.services.config;
    let connection = slimci_broker::connect(
        amqp_url,
        &format!("slimci-agent {} jobs", config.name),
        drain,
    )
    .await?;
    let publisher = ConfirmedPublisher::open(&connection).await?;
    slimci_broker::declare_topology(publisher.channel(), &worker.topology).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(config.slots, BasicQosOptions::default())
        .await?;
    let tag = format!("slimci-agent-{}", config.name);
    let mut consumer = channel
        .basic_consume(
            worker.topology.jobs_queue().as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %worker.topology.jobs_queue(), "waiting for jobs");
    loop {
        let delivery = tokio::select! {
            () = drain.cancelled() => {
                // Stop deliveries; jobs in flight keep their channel to ack on.
                let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                return Ok(());
            }
            delivery = consumer.next() => delivery,
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => return Err(error.into()),
            None => return Err(BrokerError::Disconnected),
        };
        let job = match slimci_proto::decode::<ToAgentMessage>(&delivery.data) {
            Ok(ToAgentMessage::Job(job)) => job,
            Err(error) => {
                let reason = format!("agent {} refused a job message: {error}", config.name);
                tracing::warn!(%reason, "dead-lettering job message");
                slimci_broker::dead_letter(
                    &publisher,
                    &worker.topology,
                    &worker.topology.jobs_dead_queue(),
                    &delivery,
                    &reason,
                )
                .await?;
                continue;
            }
        };
        let worker = worker.clone();
        jobs.spawn(async move {
            let run_id = job.run_id;
            let settle = worker.take_job(job).await;
            let settled = match settle {
                Settle::Ack => delivery.ack(BasicAckOptions::default()).await,
                Settle::Requeue => delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await,
            };
            if let Err(error) = settled {
                tracing::warn!(%error, run = %run_id, "could not settle the job message (its channel is gone); the broker will redeliver it and the claim fence refuses it");
            }
        });
    }
}

enum Settle {
    Ack,
    Requeue,
}

impl Worker {
    async fn claim(&self, job: &Job) -> Result<ClaimResponse, String> {
        let config = &self.services.config;
        let request = ClaimRequest {
            run_id: job.run_id,
            attempt: job.attempt,
            agent: config.name.clone(),
        };
        let url = format!(
            "{}/api/v1/agent/claim",
            config.coordinator.url.trim_end_matches('/')
        );
        let response = self
            .services
            .http
            .post(&url)
            .bearer_auth(&self.services.secrets.coordinator_token)
            .header("content-type", "application/json")
            .body(slimci_proto::encode(&request))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|error| error.to_string())?;
        if !response.status().is_success() {
            return Err(format!(
                "HTTP {}: {}",
                response.status(),
                response.text().await.unwrap_or_default()
            ));
        }
        let body = response.bytes().await.map_err(|error| error.to_string())?;
        slimci_proto::decode::<ClaimResponse>(&body).map_err(|error| error.to_string())
    }

    async fn take_job(&self, job: Job) -> Settle {
        // Registered before the claim, so a cancel that arrives right after the grant is not lost.
        // A redelivery of a run this agent is already building (its channel was closed) must
        // not touch the running build's entry; its claim is refused anyway.
        let cancel = self.abort.child_token();
        let registered = {
            let mut running = self.running.lock().expect("running lock");
            match running.entry(job.run_id) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(entry) => {
                    entry.insert(cancel.clone());
                    true
                }
            }
        };
        let settle = self.claim_and_build(&job, cancel).await;
        if registered {
            self.running
                .lock()
                .expect("running lock")
                .remove(&job.run_id);
        }
        settle
    }

    async fn claim_and_build(&self, job: &Job, cancel: CancellationToken) -> Settle {
        let claim = match self.claim(job).await {
            Ok(claim) => claim,
            Err(error) => {
                tracing::warn!(run = %job.run_id, %error, "cannot reach the coordinator to claim; returning the job to the queue");
                tokio::time::sleep(Duration::from_secs(2)).await;
                return Settle::Requeue;
            }
        };
        if !claim.granted {
            tracing::info!(run = %job.run_id, attempt = %job.attempt, reason = claim.reason.as_deref().unwrap_or(""), "claim refused; dropping the job");
            return Settle::Ack;
        }
        tracing::info!(run = %job.run_id, attempt = %job.attempt, kind = job.kind.as_str(), repository = %job.repository, "building");
        let reporter = self.events.reporter(job.run_id, job.attempt);
        let outcome = job::execute(&self.services, job, &reporter, &cancel).await;
        tracing::info!(run = %job.run_id, result = ?outcome.result, "finished");
        reporter.send_confirmed(EventBody::Finished(outcome)).await;
        Settle::Ack
    }
}

/// Listens for cancels on a private queue bound to the control exchange.
async fn control_loop(worker: Arc<Worker>, amqp_url: String, stop: CancellationToken) {
    slimci_broker::keep_connected("control listener", &stop, || {
        control_session(&worker, &amqp_url, &stop)
    })
    .await;
}

async fn control_session(
    worker: &Worker,
    amqp_url: &str,
    stop: &CancellationToken,
) -> Result<(), BrokerError> {
    let name = &worker.services.config.name;
    let connection =
        slimci_broker::connect(amqp_url, &format!("slimci-agent {name} control"), stop).await?;
    let channel = connection.create_channel().await?;
    slimci_broker::declare_topology(&channel, &worker.topology).await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            worker.topology.control_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    loop {
        let delivery = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            delivery = consumer.next() => delivery,
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => return Err(error.into()),
            None => return Err(BrokerError::Disconnected),
        };
        match slimci_proto::decode::<ControlMessage>(&delivery.data) {
            Ok(ControlMessage::Cancel { run_id, reason }) => {
                if let Some(token) = worker.running.lock().expect("running lock").get(&run_id) {
                    tracing::info!(run = %run_id, %reason, "cancelling");
                    token.cancel();
                }
            }
            Err(error) => tracing::warn!(%error, "ignoring an unreadable control message"),
        }
    }
}
