//! The job consumer: takes `<prefix>.jobs` with prefetch 1 while a slot is free (a new consumer
//! tag each time; `stop_consuming` gives back a job delivered as it stops), dead-letters job
//! messages that do not decode or check, and per job runs `Worker::take_job`: claim, settle the
//! message as `rules::after_claim` says, build (`job::execute`), then report the end as
//! `rules::attempt_end` says and wait for the broker's confirm.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use slimci_broker::BrokerError;
use slimci_proto::{CheckedJob, EventBody, ToAgentMessage, Topology};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::events::Events;
use crate::held_attempts::HeldAttempts;
use crate::job::{self, Services};
use crate::rules::{self, AfterClaim, AttemptEnd, Settle};
use crate::trace::AttemptTrace;

/// How long a job whose claim failed waits before it goes back to the queue.
const REQUEUE_DELAY: Duration = Duration::from_secs(2);

/// What taking jobs needs.
pub struct Worker {
    pub services: Services,
    pub events: Events,
    pub topology: Topology,
    pub held: Arc<HeldAttempts>,
    /// One permit per slot; the job consumer is active only while one is free.
    pub slots: Arc<Semaphore>,
    /// Fires when the agent cancels its running builds (forced shutdown).
    pub abort: CancellationToken,
}

/// Consumes jobs until `drain`, reconnecting as needed; the jobs it took run on `jobs`.
pub async fn consume_loop(
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
    let (connection, publisher) = slimci_broker::open_session(
        amqp_url,
        &format!("slimci-agent {} jobs", config.name),
        &worker.topology,
        drain,
    )
    .await?;
    let channel = connection.create_channel().await?;
    // One message at a time, and only while a slot is free: a job is acknowledged as soon as
    // its claim is granted, so no message waits unacknowledged behind a long build (RabbitMQ's
    // consumer timeout), and no job sits in this agent's buffer while another agent idles.
    channel.basic_qos(1, BasicQosOptions::default()).await?;
    // A new tag for every consumer: RabbitMQ counts a consumer's unacknowledged deliveries by
    // its tag, so a consumer re-created under the old tag would be credited with the acks of
    // its predecessor's deliveries and be sent more than one job at a time.
    let mut consumers = 0u64;
    let mut consuming: Option<(String, lapin::Consumer)> = None;
    tracing::info!(queue = %worker.topology.jobs_queue(), slots = config.slots, "waiting for jobs");
    loop {
        let permit = tokio::select! {
            () = drain.cancelled() => return Ok(()),
            permit = worker.slots.clone().acquire_owned() => permit.expect("the slot semaphore is never closed"),
        };
        if consuming.is_none() {
            consumers += 1;
            let tag = format!("slimci-agent-{}-{consumers}", config.name);
            let consumer = channel
                .basic_consume(
                    worker.topology.jobs_queue().as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            consuming = Some((tag, consumer));
        }
        let (_, stream) = consuming.as_mut().expect("consuming");
        let delivery = tokio::select! {
            () = drain.cancelled() => {
                if let Some((tag, old)) = consuming.take() {
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
        let job = match read_job(&delivery.data) {
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
        if full && let Some((tag, old)) = consuming.take() {
            // Every slot is taken: stop consuming, so the broker hands the next job to an agent
            // with room (a job it sent meanwhile goes back to the queue).
            stop_consuming(&channel, &tag, old).await?;
        }
    }
}

/// Why a job message is refused before anything runs.
#[derive(Debug, thiserror::Error)]
enum UnreadableJob {
    #[error(transparent)]
    Decode(#[from] slimci_proto::DecodeError),
    #[error(transparent)]
    Check(#[from] slimci_proto::JobError),
}

/// Decodes a job message and checks it into what the agent builds.
fn read_job(bytes: &[u8]) -> Result<CheckedJob, UnreadableJob> {
    let ToAgentMessage::Job(job) = slimci_proto::decode::<ToAgentMessage>(bytes)?;
    Ok(job.check()?)
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
        delivery.nack(requeue()).await?;
    }
    Ok(())
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        ..Default::default()
    }
}

impl Worker {
    /// Claims the job, settles its message, builds it and reports the end.
    async fn take_job(&self, job: CheckedJob, delivery: lapin::message::Delivery) {
        // Registered before the claim, so a cancel that arrives right after the grant is not
        // lost. A redelivery of a run this agent is already building must not touch that
        // entry; its claim is refused anyway.
        let cancel = self.abort.child_token();
        let registered = self.held.register(job.run_id, job.attempt, cancel.clone());
        let trace = AttemptTrace::start(
            &self.services.telemetry,
            delivery.properties.headers().as_ref(),
            &job,
            &self.services.config.name,
            &self.topology.jobs_queue(),
        );
        let (trace, consumer_span) = trace.unzip();
        let ended = self
            .claim_and_build(&job, delivery, cancel, trace.as_ref())
            .await;
        if let Some(span) = consumer_span {
            span.end(ended);
        }
        if registered {
            self.held.remove(job.run_id);
        }
    }

    /// Returns how the attempt ended, for its trace: a result, `released`, or why it was not
    /// built.
    async fn claim_and_build(
        &self,
        job: &CheckedJob,
        delivery: lapin::message::Delivery,
        cancel: CancellationToken,
        trace: Option<&AttemptTrace>,
    ) -> &'static str {
        // The coordinator starts the lease when it grants the claim, after this instant: the
        // agent counts its lease from here, so it never thinks it has more time than it has.
        let claim_sent_at = tokio::time::Instant::now();
        let claim_wall = std::time::SystemTime::now();
        let claim = self
            .services
            .coordinator
            .claim(job.run_id, job.attempt)
            .await;
        if let Some(trace) = trace {
            match &claim {
                Ok(answer) if answer.granted => trace.claim(claim_wall, "granted", true),
                Ok(answer) => trace.claim(
                    claim_wall,
                    answer.reason.as_deref().unwrap_or("refused"),
                    false,
                ),
                Err(error) => trace.claim(claim_wall, &error.to_string(), false),
            }
        }
        if let Err(error) = &claim {
            tracing::warn!(run = %job.run_id, %error, "cannot reach the coordinator to claim; returning the job to the queue");
        }
        let decision = rules::after_claim(claim.as_ref().ok());
        match decision.settle() {
            Settle::Requeue => {
                tokio::time::sleep(REQUEUE_DELAY).await;
                let _ = delivery.nack(requeue()).await;
            }
            Settle::Ack => {
                if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
                    tracing::warn!(%error, run = %job.run_id, "could not acknowledge the job message (its channel is gone); a redelivery is refused by the claim fence");
                }
            }
        }
        let lease = match decision {
            AfterClaim::Requeue => return "requeued",
            AfterClaim::Drop { reason } => {
                tracing::info!(run = %job.run_id, attempt = %job.attempt, reason = reason.as_deref().unwrap_or(""), "claim refused; dropping the job");
                return "refused";
            }
            AfterClaim::Build { lease } => lease,
        };
        self.held.granted(job.run_id, lease, claim_sent_at);
        tracing::info!(run = %job.run_id, attempt = %job.attempt, kind = job.run_kind().as_str(), repository = %job.repository, "building");
        let reporter = self.events.reporter(job.run_id, job.attempt);
        let mut outcome = job::execute(&self.services, job, &reporter, &cancel, trace).await;
        if let Some(usage) = &mut outcome.usage {
            usage.slot_busy_s = claim_sent_at.elapsed().as_secs_f64();
        }
        let lease_loss = self.held.lease_loss(job.run_id);
        match rules::attempt_end(outcome.result, lease_loss, self.abort.is_cancelled()) {
            AttemptEnd::Release(reason) => {
                tracing::warn!(run = %job.run_id, %reason, "released the attempt; the coordinator retries it");
                reporter
                    .send_confirmed(EventBody::Released {
                        reason: reason.to_string(),
                    })
                    .await;
                "released"
            }
            AttemptEnd::Finish => {
                tracing::info!(run = %job.run_id, result = ?outcome.result, "finished");
                let result = slimci_client::RunStatus::from_result(outcome.result).as_str();
                reporter.send_confirmed(EventBody::Finished(outcome)).await;
                result
            }
        }
    }
}
