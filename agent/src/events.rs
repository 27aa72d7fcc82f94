//! Reporting to the coordinator: every event of an attempt gets the next sequence number and
//! goes through one publisher task that holds it in memory until the broker confirms it, across
//! reconnects, so a broker restart delays events but loses none.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use slimci_broker::BrokerError;
use slimci_proto::{AgentEvent, AgentName, Attempt, EventBody, RunId, Topology};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

struct Outgoing {
    event: AgentEvent,
    /// Told when the broker confirmed the event.
    confirmed: Option<oneshot::Sender<()>>,
}

/// Sends the events of one attempt.
#[derive(Clone)]
pub struct Reporter {
    run_id: RunId,
    attempt: Attempt,
    agent: AgentName,
    seq: Arc<AtomicU64>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
}

impl Reporter {
    fn event(&self, body: EventBody) -> AgentEvent {
        AgentEvent {
            run_id: self.run_id,
            attempt: self.attempt,
            agent: self.agent.clone(),
            seq: self.seq.fetch_add(1, Ordering::SeqCst) + 1,
            at: chrono::Utc::now(),
            body,
        }
    }

    pub fn send(&self, body: EventBody) {
        let _ = self.outgoing.send(Outgoing {
            event: self.event(body),
            confirmed: None,
        });
    }

    /// Sends an event and waits until the broker has it (or the agent is shutting down).
    pub async fn send_confirmed(&self, body: EventBody) {
        let (confirmed, wait) = oneshot::channel();
        if self
            .outgoing
            .send(Outgoing {
                event: self.event(body),
                confirmed: Some(confirmed),
            })
            .is_ok()
        {
            let _ = wait.await;
        }
    }
}

/// Hands out reporters and owns the publishing task's inbox.
#[derive(Clone)]
pub struct Events {
    agent: AgentName,
    outgoing: mpsc::UnboundedSender<Outgoing>,
}

impl Events {
    pub fn reporter(&self, run_id: RunId, attempt: Attempt) -> Reporter {
        Reporter {
            run_id,
            attempt,
            agent: self.agent.clone(),
            seq: Arc::new(AtomicU64::new(0)),
            outgoing: self.outgoing.clone(),
        }
    }
}

/// Starts the publisher. It runs until every `Events` and `Reporter` is dropped and its buffer
/// is delivered, or until `give_up` fires.
pub fn start(
    agent: AgentName,
    amqp_url: String,
    topology: Topology,
    give_up: CancellationToken,
) -> (Events, tokio::task::JoinHandle<()>) {
    let (outgoing, incoming) = mpsc::unbounded_channel();
    let task = tokio::spawn(publish_loop(amqp_url, topology, incoming, give_up));
    (Events { agent, outgoing }, task)
}

async fn publish_loop(
    amqp_url: String,
    topology: Topology,
    mut incoming: mpsc::UnboundedReceiver<Outgoing>,
    give_up: CancellationToken,
) {
    let mut buffer: VecDeque<Outgoing> = VecDeque::new();
    let mut closed = false;
    let mut delay = Duration::from_millis(200);
    loop {
        if closed && buffer.is_empty() {
            return;
        }
        let session = publish_session(
            &amqp_url,
            &topology,
            &mut incoming,
            &mut buffer,
            &mut closed,
            &give_up,
        )
        .await;
        match session {
            Ok(()) => return,
            Err(BrokerError::Cancelled) => {
                if !buffer.is_empty() {
                    tracing::warn!(
                        unsent = buffer.len(),
                        "gave up delivering events at shutdown"
                    );
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, buffered = buffer.len(), "event publisher lost the broker; reconnecting")
            }
        }
        tokio::select! {
            () = give_up.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

async fn publish_session(
    amqp_url: &str,
    topology: &Topology,
    incoming: &mut mpsc::UnboundedReceiver<Outgoing>,
    buffer: &mut VecDeque<Outgoing>,
    closed: &mut bool,
    give_up: &CancellationToken,
) -> Result<(), BrokerError> {
    let (_connection, publisher) =
        slimci_broker::open_session(amqp_url, "slimci-agent events", topology, give_up).await?;
    let queue = topology.events_queue();
    loop {
        while let Some(outgoing) = buffer.front_mut() {
            let payload = slimci_proto::encode(&outgoing.event);
            tokio::select! {
                () = give_up.cancelled() => return Err(BrokerError::Cancelled),
                published = publisher.publish_to_queue(&queue, &payload) => published?,
            }
            if let Some(confirmed) = outgoing.confirmed.take() {
                let _ = confirmed.send(());
            }
            buffer.pop_front();
        }
        if *closed {
            return Ok(());
        }
        tokio::select! {
            () = give_up.cancelled() => return Err(BrokerError::Cancelled),
            next = incoming.recv() => match next {
                Some(outgoing) => buffer.push_back(outgoing),
                None => *closed = true,
            },
        }
        while let Ok(outgoing) = incoming.try_recv() {
            buffer.push_back(outgoing);
        }
    }
}
