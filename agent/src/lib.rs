//! The slimci agent: takes jobs from RabbitMQ (prefetch = slots), claims each with the
//! coordinator, checks out the exact commit, runs dbt, streams logs and results back, and
//! uploads artifacts.
//!
//! Layers: `worker` (this file) speaks AMQP and HTTP to the coordinator; `job` runs one
//! attempt through its phases using `git`, `state`, `warehouse` and `process`.

pub mod cache;
pub mod config;
pub mod dbtlog;
pub mod events;
pub mod git;
pub mod job;
pub mod process;
pub mod redact;
pub mod reuse;
pub mod sandbox;
pub mod state;
pub mod warehouse;
pub mod warm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use slimci_broker::{BrokerError, ConfirmedPublisher};
use slimci_proto::{
    Attempt, ClaimRequest, ClaimResponse, ControlMessage, EventBody, HeartbeatRequest,
    HeartbeatResponse, Job, Lease, RunId, RunResult, ToAgentMessage, Topology,
};
use tokio::sync::Semaphore;
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

/// An attempt this agent holds.
struct RunningJob {
    attempt: Attempt,
    cancel: CancellationToken,
    /// Zero until the claim is granted.
    lease: Duration,
    renewed_at: Instant,
    /// Set when the agent stopped the build because it no longer holds the lease: the attempt
    /// is then released rather than reported cancelled.
    fenced: Option<String>,
}

type Running = Arc<Mutex<HashMap<RunId, RunningJob>>>;

struct Worker {
    services: Services,
    events: Events,
    topology: Topology,
    running: Running,
    /// One permit per slot; the job consumer is active only while one is free.
    slots: Arc<Semaphore>,
    abort: CancellationToken,
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
    let cache = Arc::new(open_cache(&config)?);
    // What a pre-started dbt may touch before it knows its build: any build's paths.
    let warm = if config.prestart_dbt {
        let paths = sandbox::BuildPaths {
            write: vec![runs.clone(), root.clone()],
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
    let dbt_identity = reuse::dbt_identity(&config.dbt);
    tracing::info!(dir = %cache.root().display(), max_bytes = config.cache.max_bytes, dbt = %dbt_identity, "caches ready");
    let config = Arc::new(config);
    let worker = Arc::new(Worker {
        services: Services {
            git: Arc::new(git::GitCache::new(
                cache.root().join("git"),
                secrets.git_https_token.clone(),
            )),
            states: state::StateCache::new(cache.clone()),
            cache,
            dbt_identity,
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
            warm,
        },
        events,
        topology,
        running: Arc::default(),
        slots: Arc::new(Semaphore::new(usize::from(config.slots))),
        abort: shutdown.abort.clone(),
    });
    tracing::info!(agent = %config.name, slots = config.slots, "agent starting");
    if let Some(pool) = &worker.services.warm {
        let (pool, sandbox) = (pool.clone(), worker.services.sandbox.clone());
        tokio::spawn(async move { pool.replenish(&sandbox).await });
    }

    let jobs = TaskTracker::new();
    let control = tokio::spawn(control_loop(
        worker.clone(),
        secrets.amqp_url.clone(),
        shutdown.drain.clone(),
    ));
    let heartbeats = tokio::spawn(heartbeat_loop(worker.clone()));
    consume_loop(&worker, &secrets.amqp_url, &jobs, &shutdown.drain).await;
    jobs.close();
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
    tracing::info!(
        running = jobs.len(),
        "no longer taking jobs; waiting for running ones"
    );
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
    // One message at a time, and only while a slot is free: a job is acknowledged as soon as
    // its claim is granted, so no message waits unacknowledged behind a long build (RabbitMQ's
    // consumer timeout), and no job sits in this agent's buffer while another agent idles.
    channel.basic_qos(1, BasicQosOptions::default()).await?;
    // A new tag for every consumer: RabbitMQ counts a consumer's unacknowledged deliveries by
    // its tag, so a consumer re-created under the old tag would be credited with the acks of
    // its predecessor's deliveries and be sent more than one job at a time.
    let mut consumers = 0u64;
    let mut tag = String::new();
    let mut consumer: Option<lapin::Consumer> = None;
    tracing::info!(queue = %worker.topology.jobs_queue(), slots = config.slots, "waiting for jobs");
    loop {
        let permit = tokio::select! {
            () = drain.cancelled() => return Ok(()),
            permit = worker.slots.clone().acquire_owned() => permit.expect("the slot semaphore is never closed"),
        };
        if consumer.is_none() {
            consumers += 1;
            tag = format!("slimci-agent-{}-{consumers}", config.name);
            consumer = Some(
                channel
                    .basic_consume(
                        worker.topology.jobs_queue().as_str().into(),
                        tag.as_str().into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?,
            );
        }
        let stream = consumer.as_mut().expect("consuming");
        let delivery = tokio::select! {
            () = drain.cancelled() => {
                if let Some(old) = consumer.take() {
                    stop_consuming(&channel, &tag, old).await?;
                }
                return Ok(());
            }
            delivery = stream.next() => delivery,
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => return Err(error.into()),
            None => return Err(BrokerError::Disconnected),
        };
        let checked = slimci_proto::decode::<ToAgentMessage>(&delivery.data)
            .map_err(|error| error.to_string())
            .and_then(|ToAgentMessage::Job(job)| {
                job.check().map(|()| job).map_err(|error| error.to_string())
            });
        let job = match checked {
            Ok(job) => job,
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
        let full = worker.slots.available_permits() == 0;
        let taking = worker.clone();
        jobs.spawn(async move {
            taking.take_job(job, delivery).await;
            drop(permit);
        });
        if full && let Some(old) = consumer.take() {
            // Every slot is taken: stop consuming, so the broker hands the next job to an agent
            // with room (a job it sent meanwhile goes back to the queue).
            stop_consuming(&channel, &tag, old).await?;
        }
    }
}

/// Cancels a consumer and gives back, for other agents, any job the broker sent it before the
/// cancel took effect (dropping the consumer would strand it, unacknowledged, until the channel
/// closes).
async fn stop_consuming(
    channel: &lapin::Channel,
    tag: &str,
    mut consumer: lapin::Consumer,
) -> Result<(), BrokerError> {
    channel
        .basic_cancel(tag.into(), BasicCancelOptions::default())
        .await?;
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
    {
        tracing::info!("returning a job the broker sent as consuming stopped");
        delivery
            .nack(lapin::options::BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await?;
    }
    Ok(())
}

impl Worker {
    /// Posts a protocol message to the coordinator's agent API and decodes the versioned answer.
    async fn call_coordinator<Request: serde::Serialize, Answer: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        request: &Request,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let config = &self.services.config;
        let url = format!(
            "{}/api/v1/agent/{path}",
            config.coordinator.url.trim_end_matches('/')
        );
        let response = self
            .services
            .http
            .post(&url)
            .bearer_auth(&self.services.secrets.coordinator_token)
            .header("content-type", "application/json")
            .body(slimci_proto::encode(request))
            .timeout(timeout)
            .send()
            .await
            .map_err(|error| error.to_string())?;
        if !response.status().is_success() {
            let status = response.status();
            return Err(format!(
                "HTTP {status}: {}",
                response.text().await.unwrap_or_default()
            ));
        }
        let body = response.bytes().await.map_err(|error| error.to_string())?;
        slimci_proto::decode::<Answer>(&body).map_err(|error| error.to_string())
    }

    async fn claim(&self, job: &Job) -> Result<ClaimResponse, String> {
        let request = ClaimRequest {
            run_id: job.run_id,
            attempt: job.attempt,
            agent: self.services.config.name.clone(),
        };
        self.call_coordinator("claim", &request, Duration::from_secs(30))
            .await
    }

    async fn heartbeat(&self, leases: Vec<Lease>) -> Result<HeartbeatResponse, String> {
        let request = HeartbeatRequest {
            agent: self.services.config.name.clone(),
            leases,
        };
        self.call_coordinator("heartbeat", &request, Duration::from_secs(10))
            .await
    }

    /// Claims the job, acknowledges its message, builds it and reports the end.
    async fn take_job(&self, job: Job, delivery: lapin::message::Delivery) {
        // Registered before the claim, so a cancel that arrives right after the grant is not lost.
        // A redelivery of a run this agent is already building must not touch that entry; its
        // claim is refused anyway.
        let cancel = self.abort.child_token();
        let registered = {
            let mut running = self.running.lock().expect("running lock");
            match running.entry(job.run_id) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(entry) => {
                    entry.insert(RunningJob {
                        attempt: job.attempt,
                        cancel: cancel.clone(),
                        lease: Duration::ZERO,
                        renewed_at: Instant::now(),
                        fenced: None,
                    });
                    true
                }
            }
        };
        self.claim_and_build(&job, delivery, cancel).await;
        if registered {
            self.running
                .lock()
                .expect("running lock")
                .remove(&job.run_id);
        }
    }

    async fn claim_and_build(
        &self,
        job: &Job,
        delivery: lapin::message::Delivery,
        cancel: CancellationToken,
    ) {
        let claim = match self.claim(job).await {
            Ok(claim) => claim,
            Err(error) => {
                tracing::warn!(run = %job.run_id, %error, "cannot reach the coordinator to claim; returning the job to the queue");
                tokio::time::sleep(Duration::from_secs(2)).await;
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
                return;
            }
        };
        // The claim is the durable record now: from here the lease, not the message, keeps the
        // run alive.
        if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
            tracing::warn!(%error, run = %job.run_id, "could not acknowledge the job message (its channel is gone); a redelivery is refused by the claim fence");
        }
        if !claim.granted {
            tracing::info!(run = %job.run_id, attempt = %job.attempt, reason = claim.reason.as_deref().unwrap_or(""), "claim refused; dropping the job");
            return;
        }
        if let Some(entry) = self
            .running
            .lock()
            .expect("running lock")
            .get_mut(&job.run_id)
        {
            entry.lease = Duration::from_secs(claim.lease_secs.max(1));
            entry.renewed_at = Instant::now();
        }
        tracing::info!(run = %job.run_id, attempt = %job.attempt, kind = job.kind.as_str(), repository = %job.repository, "building");
        let reporter = self.events.reporter(job.run_id, job.attempt);
        let outcome = job::execute(&self.services, job, &reporter, &cancel).await;
        let fenced = self
            .running
            .lock()
            .expect("running lock")
            .get(&job.run_id)
            .and_then(|entry| entry.fenced.clone());
        let released = match (&outcome.result, fenced) {
            (RunResult::Cancelled, Some(reason)) => Some(reason),
            (RunResult::Cancelled, None) if self.abort.is_cancelled() => {
                Some("the agent is shutting down".to_owned())
            }
            _ => None,
        };
        match released {
            Some(reason) => {
                tracing::warn!(run = %job.run_id, %reason, "released the attempt; the coordinator retries it");
                reporter
                    .send_confirmed(EventBody::Released { reason })
                    .await;
            }
            None => {
                tracing::info!(run = %job.run_id, result = ?outcome.result, "finished");
                reporter.send_confirmed(EventBody::Finished(outcome)).await;
            }
        }
    }
}

/// Renews the leases of the attempts this agent holds, every third of a lease. An attempt the
/// coordinator says is not ours any more, or one we could not renew for three quarters of a
/// lease, is stopped: by then the coordinator may hand it to another agent, and two attempts of
/// one run must never build at once.
async fn heartbeat_loop(worker: Arc<Worker>) {
    loop {
        let (leases, interval) = {
            let running = worker.running.lock().expect("running lock");
            let leases: Vec<Lease> = running
                .iter()
                .filter(|(_, job)| !job.lease.is_zero())
                .map(|(run_id, job)| Lease {
                    run_id: *run_id,
                    attempt: job.attempt,
                })
                .collect();
            let shortest = running
                .values()
                .filter(|job| !job.lease.is_zero())
                .map(|job| job.lease)
                .min();
            (
                leases,
                shortest.map_or(Duration::from_secs(1), |lease| {
                    (lease / 3).max(Duration::from_millis(200))
                }),
            )
        };
        if !leases.is_empty() {
            match worker.heartbeat(leases.clone()).await {
                Ok(answer) => {
                    let mut running = worker.running.lock().expect("running lock");
                    for lease in &leases {
                        let Some(job) = running.get_mut(&lease.run_id) else {
                            continue;
                        };
                        if answer.lost.contains(lease) {
                            if job.fenced.is_none() {
                                tracing::warn!(run = %lease.run_id, attempt = %lease.attempt, "the coordinator says this attempt is not ours any more; stopping it");
                                job.fenced = Some(
                                    "the coordinator no longer counts this attempt as ours"
                                        .to_owned(),
                                );
                                job.cancel.cancel();
                            }
                        } else {
                            job.renewed_at = Instant::now();
                            job.lease = Duration::from_secs(answer.lease_secs.max(1));
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "heartbeat failed; leases not renewed"),
            }
            let mut running = worker.running.lock().expect("running lock");
            for (run_id, job) in running.iter_mut() {
                let unrenewed = job.renewed_at.elapsed();
                if !job.lease.is_zero() && unrenewed > job.lease * 3 / 4 && job.fenced.is_none() {
                    tracing::warn!(run = %run_id, unrenewed_s = unrenewed.as_secs(), "could not renew the lease for three quarters of it; stopping the build before the coordinator retries it elsewhere");
                    job.fenced = Some(format!(
                        "the agent could not renew its lease for {} s",
                        unrenewed.as_secs()
                    ));
                    job.cancel.cancel();
                }
            }
        }
        tokio::time::sleep(interval).await;
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
                if let Some(job) = worker.running.lock().expect("running lock").get(&run_id) {
                    tracing::info!(run = %run_id, %reason, "cancelling");
                    job.cancel.cancel();
                }
            }
            Err(error) => tracing::warn!(%error, "ignoring an unreadable control message"),
        }
    }
}
