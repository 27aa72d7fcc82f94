//! The coordinator's side of RabbitMQ: an outbox publisher (queued runs become job messages,
//! requested cancels become control messages) and the consumer of agent events. Both reconnect
//! with backoff; while the broker is away, runs wait in the outbox and agents buffer events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use slimci_broker::BrokerError;
use slimci_proto::{
    AgentEvent, ControlMessage, EventBody, GitTarget, Job, JobError, ProductionStateRef, RepoName,
    RunId, RunKind, ToAgentMessage, Topology,
};
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::rules::{self, ActiveRun, Caps, EventDisposition, LostReason, RunStatus};
use crate::store::Run;

/// How often a cancel is broadcast again while its run is still building.
const CANCEL_RESEND: Duration = Duration::from_secs(10);

/// Why a queued run cannot become a job; the run ends `error` with this message.
#[derive(Debug, thiserror::Error)]
pub enum JobRefused {
    #[error("repository `{0}` is no longer configured")]
    RepositoryGone(RepoName),
    #[error("this run cannot be built: {0}")]
    Invalid(#[from] JobError),
}

/// The job message for the current attempt of a queued run, checked as an agent will check it
/// (`Job::check`), so a run that could not be built ends here with the reason instead of
/// being dead-lettered by the agent.
pub fn job_for(state: &AppState, run: &Run) -> Result<Job, JobRefused> {
    let repository = state
        .config
        .repository(run.repository.as_str())
        .ok_or_else(|| JobRefused::RepositoryGone(run.repository.clone()))?;
    let production_state = run
        .compared_against
        .as_ref()
        .map(|stamp| ProductionStateRef {
            deploy_run_id: stamp.deploy_run_id,
            sha: stamp.sha.clone(),
            manifest_url: state.artifact_url(stamp.deploy_run_id, "manifest.json"),
            manifest_sha256: stamp.manifest_sha256.clone(),
        });
    let job = Job {
        run_id: run.id,
        attempt: run.attempt,
        kind: run.kind,
        repository: run.repository.clone(),
        clone_url: repository.clone_url.clone(),
        project_dir: repository.project_dir.clone(),
        git: GitTarget {
            sha: run.sha.clone(),
            fetch_ref: run.fetch_ref.clone(),
        },
        pr_number: run.pr,
        isolation: run.isolation.clone(),
        production_state,
        timeout_secs: run.timeout_secs,
        warehouse: repository
            .warehouse
            .as_ref()
            .map(|warehouse| warehouse.to_job()),
    };
    job.clone().check()?;
    Ok(job)
}

/// The waiting runs the scheduling rules let go now, oldest first (the publisher's, and the
/// router's for routed CI runs).
pub(crate) async fn runs_to_dispatch(state: &AppState) -> Vec<ActiveRun> {
    let active = match state.store.active_for_rules().await {
        Ok(active) => active,
        Err(error) => {
            tracing::error!(%error, "cannot read the runs to dispatch");
            return Vec::new();
        }
    };
    let (out, waiting_rules): (Vec<ActiveRun>, Vec<ActiveRun>) =
        active.into_iter().partition(|run| run.dispatched);
    let caps = Caps::from_configured(
        state.config.scheduling.global_cap,
        state
            .config
            .repositories
            .iter()
            .map(|repository| (repository.name.clone(), repository.max_concurrent)),
    );
    let chosen = rules::dispatch(&waiting_rules, &out, &caps);
    waiting_rules
        .into_iter()
        .filter(|run| chosen.contains(&run.id))
        .collect()
}

/// The run to dispatch, read once; a CI run first gets the production state current when it
/// starts, which it compares against.
async fn prepare_dispatch(state: &AppState, run: ActiveRun) -> Option<Run> {
    let stamped = async {
        if run.kind == RunKind::Ci
            && let Some(production) = state.store.production_state(&run.repository).await?
        {
            state
                .store
                .stamp_production_state(run.id, &production)
                .await?;
        }
        state.store.run(run.id).await
    };
    match stamped.await {
        Ok(run) => run,
        Err(error) => {
            tracing::error!(%error, run = %run.id, "cannot prepare a run to dispatch; trying again later");
            None
        }
    }
}

/// Publishes the outbox until shutdown, reconnecting as needed.
pub async fn publisher_loop(
    state: Arc<AppState>,
    amqp_url: String,
    topology: Topology,
    shutdown: CancellationToken,
) {
    slimci_broker::keep_connected("job publisher", &shutdown, || {
        publish_session(&state, &amqp_url, &topology, &shutdown)
    })
    .await;
}

async fn publish_session(
    state: &AppState,
    amqp_url: &str,
    topology: &Topology,
    shutdown: &CancellationToken,
) -> Result<(), BrokerError> {
    let (connection, publisher) =
        slimci_broker::open_session(amqp_url, "slimci-coordinator publisher", topology, shutdown)
            .await?;
    tracing::info!("job publisher connected");
    // When each pending cancel was last broadcast. An agent whose control link was down when it
    // went out gets it again; agents ignore cancels of runs they are not building.
    let mut cancels_sent: HashMap<RunId, Instant> = HashMap::new();
    loop {
        let notified = state.outbox.notified();
        for run in runs_to_dispatch(state).await {
            // A routed CI run goes to the agents only once the router chose the fleet; when
            // that cannot be read, it waits.
            if run.kind == RunKind::Ci && state.dbt_cloud.repository(&run.repository).is_some() {
                match state.store.run(run.id).await {
                    Ok(Some(stored)) if !crate::dbt_cloud::awaits_routing(state, &stored) => {}
                    Ok(_) => continue,
                    Err(error) => {
                        tracing::error!(%error, run = %run.id, "cannot read whether a run was routed; it waits");
                        continue;
                    }
                }
            }
            let run = match prepare_dispatch(state, run).await {
                Some(run) => run,
                None => continue,
            };
            let job = match job_for(state, &run) {
                Ok(job) => job,
                Err(refused) => {
                    tracing::error!(run = %run.id, %refused, "not dispatched");
                    let _ = state
                        .store
                        .end_queued(run.id, RunStatus::Error, &refused.to_string())
                        .await;
                    let _ = state.changes.send(run.id);
                    continue;
                }
            };
            let payload = slimci_proto::encode(&ToAgentMessage::Job(job));
            let jobs_queue = topology.jobs_queue();
            let dispatch = crate::telemetry::start_dispatch(state, &run, &jobs_queue);
            let mut headers = FieldTable::default();
            if let Some(dispatch) = &dispatch {
                slimci_telemetry::inject(&mut headers, &dispatch.traceparent);
            }
            let published = publisher.publish("", &jobs_queue, &payload, headers).await;
            if let Some(dispatch) = dispatch {
                dispatch.end(published.as_ref().err().map(ToString::to_string));
            }
            published?;
            if let Err(error) = state.store.mark_dispatched(run.id).await {
                tracing::error!(%error, run = %run.id, "dispatched, but could not mark it; it may be dispatched twice (claims are fenced)");
            }
            tracing::info!(run = %run.id, attempt = %run.attempt, "job queued");
        }
        let dead: Vec<(RunId, String)> =
            std::mem::take(&mut *state.dead_jobs.lock().expect("dead jobs lock"));
        for (index, (run_id, reason)) in dead.iter().enumerate() {
            let Ok(Some(run)) = state.store.run(*run_id).await else {
                continue;
            };
            let Ok(job) = job_for(state, &run) else {
                continue;
            };
            let mut headers = FieldTable::default();
            headers.insert(
                slimci_proto::DEAD_REASON_HEADER.into(),
                lapin::types::AMQPValue::LongString(reason.as_str().into()),
            );
            let payload = slimci_proto::encode(&ToAgentMessage::Job(job));
            if let Err(error) = publisher
                .publish(
                    &topology.dead_letter_exchange(),
                    &topology.jobs_dead_queue(),
                    &payload,
                    headers,
                )
                .await
            {
                state
                    .dead_jobs
                    .lock()
                    .expect("dead jobs lock")
                    .extend(dead[index..].iter().cloned());
                return Err(error);
            }
            tracing::info!(run = %run_id, %reason, "poison job dead-lettered");
            state.metrics.dead_lettered.inc(&["jobs"]);
        }
        if state.fleet.probe_due() {
            let consumers =
                slimci_broker::consumer_count(publisher.channel(), &topology.jobs_queue()).await?;
            state.fleet.record_jobs_consumers(consumers);
        }
        let pending = state.store.cancel_pending_runs().await.unwrap_or_default();
        cancels_sent.retain(|run, _| pending.contains(run));
        for run in pending {
            if cancels_sent
                .get(&run)
                .is_some_and(|sent| sent.elapsed() < CANCEL_RESEND)
            {
                continue;
            }
            let message = ControlMessage::Cancel {
                run_id: run,
                reason: rules::CANCELLED_BY_USER.to_owned(),
            };
            publisher
                .publish(
                    &topology.control_exchange(),
                    "",
                    &slimci_proto::encode(&message),
                    FieldTable::default(),
                )
                .await?;
            cancels_sent.insert(run, Instant::now());
            tracing::info!(%run, "cancel sent to agents");
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = notified => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        if !connection.status().connected() {
            return Err(BrokerError::Disconnected);
        }
    }
}

/// Consumes agent events until shutdown, reconnecting as needed.
pub async fn events_loop(
    state: Arc<AppState>,
    amqp_url: String,
    topology: Topology,
    shutdown: CancellationToken,
) {
    slimci_broker::keep_connected("event consumer", &shutdown, || {
        events_session(&state, &amqp_url, &topology, &shutdown)
    })
    .await;
}

async fn events_session(
    state: &AppState,
    amqp_url: &str,
    topology: &Topology,
    shutdown: &CancellationToken,
) -> Result<(), BrokerError> {
    let (connection, publisher) =
        slimci_broker::open_session(amqp_url, "slimci-coordinator events", topology, shutdown)
            .await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(64, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            topology.events_queue().as_str().into(),
            "slimci-coordinator".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!("event consumer connected");
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            delivery = consumer.next() => delivery,
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => return Err(error.into()),
            None => return Err(BrokerError::Disconnected),
        };
        let event: AgentEvent = match slimci_proto::decode(&delivery.data) {
            Ok(event) => event,
            Err(error) => {
                let reason = format!("coordinator refused an agent event: {error}");
                tracing::warn!(%reason, "dead-lettering event");
                slimci_broker::dead_letter(
                    &publisher,
                    topology,
                    &topology.events_dead_queue(),
                    &delivery,
                    &reason,
                )
                .await?;
                state.metrics.dead_lettered.inc(&["events"]);
                continue;
            }
        };
        // Events of one attempt must be applied in order (log lines are numbered, sequence
        // numbers drop duplicates), so a storage failure is retried in place, never requeued
        // behind later events.
        let mut retry = Duration::from_millis(200);
        loop {
            match handle_event(state, &event).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::error!(%error, run = %event.run_id, retry_in = ?retry, "cannot record an agent event; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => {
                            delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
                            return Ok(());
                        }
                        () = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(Duration::from_secs(10));
                }
            }
        }
        delivery.ack(BasicAckOptions::default()).await?;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Log(#[from] crate::logs::LogError),
}

/// Records one agent event: log lines on disk first (idempotently), then the rest in the store.
pub async fn handle_event(state: &AppState, event: &AgentEvent) -> Result<(), EventError> {
    let Some(disposition) = state.store.event_disposition(event).await? else {
        tracing::warn!(run = %event.run_id, agent = %event.agent, "event for an unknown run; dropped");
        return Ok(());
    };
    if disposition != EventDisposition::Apply {
        tracing::debug!(run = %event.run_id, seq = event.seq, ?disposition, "event not applied");
        return Ok(());
    }
    if let EventBody::Released { reason } = &event.body {
        let reason = LostReason::Released {
            agent: event.agent.clone(),
            reason: reason.clone(),
        };
        crate::leases::give_up_attempt(state, event.run_id, event.attempt, &reason).await?;
        state.agents.ended(&event.agent, event.run_id);
        return Ok(());
    }
    if let EventBody::Log { first_line, lines } = &event.body {
        state
            .logs
            .append(event.run_id, event.attempt, *first_line, lines)?;
    }
    let applied = state.store.apply_event(event).await?;
    if applied.disposition == EventDisposition::Apply {
        record_event(state, event);
    }
    if let Some(status) = applied.finished {
        state.agents.ended(&event.agent, event.run_id);
        if let Ok(Some(run)) = state.store.run(event.run_id).await
            && let (Some(started), Some(finished)) = (run.started_ms, run.finished_ms)
        {
            state.metrics.run_duration.observe(
                &[run.kind.as_str()],
                (finished - started).max(0) as f64 / 1000.0,
            );
        }
        state.logs.close(event.run_id, event.attempt);
        // A slot, an isolation or a deploy lock may have come free.
        state.outbox.notify_one();
        tracing::info!(run = %event.run_id, status = status.as_str(), agent = %event.agent, "run finished");
    }
    let _ = state.changes.send(event.run_id);
    Ok(())
}

/// The figures an applied agent event carries, into the metrics.
fn record_event(state: &AppState, event: &AgentEvent) {
    match &event.body {
        EventBody::PhaseFinished {
            phase,
            duration_s: Some(duration_s),
            ..
        } => state
            .metrics
            .phase_duration
            .observe(&[phase.as_str()], *duration_s),
        EventBody::Caches(report) => state.metrics.caches(report),
        EventBody::Finished(outcome) => state.metrics.attempt_finished(&event.agent, outcome),
        _ => {}
    }
}
