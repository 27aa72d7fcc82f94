//! The control listener: a private queue bound to the control exchange, whose cancels stop the
//! builds this agent holds (the coordinator broadcasts a pending cancel again every 10 s until
//! the run ends, so a cancel missed while disconnected comes again).

use std::sync::Arc;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use slimci_broker::BrokerError;
use slimci_proto::{AgentName, ControlMessage, Topology};
use tokio_util::sync::CancellationToken;

use crate::held_attempts::HeldAttempts;

/// What the control listener needs.
pub struct ControlListener {
    pub agent: AgentName,
    pub amqp_url: String,
    pub topology: Topology,
    pub held: Arc<HeldAttempts>,
}

/// Listens for cancels until `stop`, reconnecting as needed.
pub async fn control_loop(listener: ControlListener, stop: CancellationToken) {
    slimci_broker::keep_connected("control listener", &stop, || {
        control_session(&listener, &stop)
    })
    .await;
}

async fn control_session(
    listener: &ControlListener,
    stop: &CancellationToken,
) -> Result<(), BrokerError> {
    let connection = slimci_broker::connect(
        &listener.amqp_url,
        &format!("slimci-agent {} control", listener.agent),
        stop,
    )
    .await?;
    slimci_broker::declare_topology(&connection, &listener.topology).await?;
    let channel = connection.create_channel().await?;
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
            listener.topology.control_exchange().as_str().into(),
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
                if listener.held.cancel(run_id) {
                    tracing::info!(run = %run_id, %reason, "cancelling");
                }
            }
            Err(error) => tracing::warn!(%error, "ignoring an unreadable control message"),
        }
    }
}
