//! The RabbitMQ adapter both processes share: connecting with backoff, declaring the topology
//! named in [`slimci_proto::Topology`] with identical arguments on both sides, publishing
//! persistent messages with publisher confirms, and dead-lettering a message with its reason.
//!
//! It knows nothing of jobs or events; callers pass bytes made by `slimci_proto::encode`.

use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicPublishOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use slimci_proto::{DEAD_REASON_HEADER, Topology};
use tokio_util::sync::CancellationToken;

/// The `[amqp]` section both processes' configurations share.
#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:5672/%2f`; or leave it out and set `url_file`.
    pub url: Option<String>,
    /// A file holding the URL, so the password stays out of the config file.
    pub url_file: Option<std::path::PathBuf>,
    /// Prefix of every queue and exchange name; deployments sharing a broker use distinct
    /// ones, and a coordinator and its agents must use the same.
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_prefix() -> String {
    "slimci".to_owned()
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &self.url.as_deref().map(mask_url))
            .field("url_file", &self.url_file)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(
        "the broker refused (nacked) a message published to `{exchange}` with key `{routing_key}`"
    )]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error(
        "slimci's queues and exchanges (`{prefix}.*`) do not exist on this broker and this user \
         may not declare them: start the coordinator, whose user may ({detail})"
    )]
    TopologyMissing { prefix: String, detail: String },
    #[error("the connection to the broker was lost")]
    Disconnected,
    #[error("shutting down")]
    Cancelled,
}

/// Hides the password of an AMQP URL for logs: `amqp://guest:<masked>@host/`.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:<masked>@{host}")
        }
        None => url.to_owned(),
    }
}

/// Runs `session` again after every broker failure, waiting 200 ms at first and twice as long
/// after each quick failure (at most 10 s), until it ends cleanly, returns
/// [`BrokerError::Cancelled`], or `stop` fires. `what` names the loop in the log.
pub async fn keep_connected<F, Fut>(what: &str, stop: &CancellationToken, mut session: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), BrokerError>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        let started = std::time::Instant::now();
        match session().await {
            Ok(()) | Err(BrokerError::Cancelled) => return,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?delay, "{what} lost the broker; reconnecting")
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            // It had been connected a while: this is a new outage, start again from short waits.
            delay = Duration::from_millis(200);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Connects, retrying with exponential backoff (capped at 10 s) until it succeeds or `shutdown`
/// fires. `name` shows in the broker's management UI.
pub async fn connect(
    url: &str,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<Connection, BrokerError> {
    let mut delay = Duration::from_millis(200);
    let url = with_default_frame_max(url);
    let url = url.as_str();
    loop {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        match Connection::connect(url, properties).await {
            Ok(connection) => return Ok(connection),
            Err(error) => {
                tracing::warn!(url = %mask_url(url), %error, retry_in = ?delay, "cannot reach the broker");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Err(BrokerError::Cancelled),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// The largest AMQP frame slimci asks for unless the URL says (`?frame_max=`). lapin keeps
/// send and receive buffers of 32 frames per connection, resident from the start: at the
/// broker's default of 128 KiB that is 8 MiB per connection. slimci's messages are small (a log
/// batch splits into a few frames), so 16 KiB frames cost nothing measurable and save most of
/// each process's memory.
pub const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// `url` with `frame_max=DEFAULT_FRAME_MAX` added to its query, unless it sets one.
pub fn with_default_frame_max(url: &str) -> String {
    if url.contains("frame_max=") {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}frame_max={DEFAULT_FRAME_MAX}")
}

fn dead_letter_arguments(topology: &Topology, dead_queue: &str) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(topology.dead_letter_exchange().into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dead_queue.into()),
    );
    arguments
}

/// A connection named `name`, a confirmed publisher on it, and the topology declared: how every
/// session of the coordinator and the agent starts.
pub async fn open_session(
    url: &str,
    name: &str,
    topology: &Topology,
    shutdown: &CancellationToken,
) -> Result<(Connection, ConfirmedPublisher), BrokerError> {
    let connection = connect(url, name, shutdown).await?;
    declare_topology(&connection, topology).await?;
    let publisher = ConfirmedPublisher::open(&connection).await?;
    Ok((connection, publisher))
}

/// Declares every queue and exchange of the topology, on a channel of its own. Idempotent; both
/// sides call it on every (re)connect, so either may start first.
///
/// A broker provisioned with least permissions (ansible's `slimci_coordinator` role) lets only
/// the coordinator's user configure slimci's names. Another user (an agent's) is refused
/// (`ACCESS_REFUSED`, which closes the channel); it then checks instead, on a fresh channel and
/// with passive declares, which need no permission, that everything it uses exists. If it does
/// not (the coordinator has never run on this broker), that is the error, and the caller's
/// reconnect loop tries again later.
pub async fn declare_topology(
    connection: &Connection,
    topology: &Topology,
) -> Result<(), BrokerError> {
    let channel = connection.create_channel().await?;
    let declared = declare_all(&channel, topology).await;
    match declared {
        Ok(()) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(BrokerError::Amqp(error)) if is_access_refused(&error) => {
            tracing::debug!(%error, "may not declare the topology; checking that it exists");
            let channel = connection.create_channel().await?;
            match check_topology(&channel, topology).await {
                Ok(()) => {
                    let _ = channel.close(200, "checked".into()).await;
                    Ok(())
                }
                Err(BrokerError::Amqp(missing)) => Err(BrokerError::TopologyMissing {
                    prefix: topology.prefix().to_owned(),
                    detail: missing.to_string(),
                }),
                Err(other) => Err(other),
            }
        }
        Err(other) => Err(other),
    }
}

fn is_access_refused(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))
    )
}

/// Passive declares of what an agent uses: the jobs and events queues, the control and
/// dead-letter exchanges. Each fails (`NOT_FOUND`) if its name does not exist.
async fn check_topology(channel: &Channel, topology: &Topology) -> Result<(), BrokerError> {
    let passive_queue = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    for queue in [topology.jobs_queue(), topology.events_queue()] {
        channel
            .queue_declare(queue.as_str().into(), passive_queue, FieldTable::default())
            .await?;
    }
    let passive_exchange = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    for exchange in [topology.control_exchange(), topology.dead_letter_exchange()] {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Fanout,
                passive_exchange,
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

async fn declare_all(channel: &Channel, topology: &Topology) -> Result<(), BrokerError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            topology.dead_letter_exchange().as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            topology.control_exchange().as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    for (queue, dead_queue) in [
        (topology.jobs_queue(), topology.jobs_dead_queue()),
        (topology.events_queue(), topology.events_dead_queue()),
    ] {
        channel
            .queue_declare(
                dead_queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                dead_queue.as_str().into(),
                topology.dead_letter_exchange().as_str().into(),
                dead_queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                dead_letter_arguments(topology, &dead_queue),
            )
            .await?;
    }
    Ok(())
}

/// How many consumers `queue` has, by a passive declare: it changes nothing, and fails (closing
/// the channel) if the queue does not exist.
pub async fn consumer_count(channel: &Channel, queue: &str) -> Result<u32, BrokerError> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(declared.consumer_count())
}

/// A channel in confirm mode: every publish returns only once the broker has taken
/// responsibility for the message.
#[derive(Clone)]
pub struct ConfirmedPublisher {
    channel: Channel,
}

impl ConfirmedPublisher {
    pub async fn open(connection: &Connection) -> Result<ConfirmedPublisher, BrokerError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(ConfirmedPublisher { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes a persistent JSON message and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        headers: FieldTable,
    ) -> Result<(), BrokerError> {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(headers);
        let confirmation = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                payload,
                properties,
            )
            .await?
            .await?;
        match confirmation {
            Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
            Confirmation::Nack(_) => Err(BrokerError::Nacked {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            }),
        }
    }

    /// Publishes to a queue through the default exchange.
    pub async fn publish_to_queue(&self, queue: &str, payload: &[u8]) -> Result<(), BrokerError> {
        self.publish("", queue, payload, FieldTable::default())
            .await
    }
}

/// Moves an unusable delivery to `dead_queue` with `reason` in its headers, then acks it.
///
/// If the copy cannot be published the delivery is rejected without requeue instead, so the
/// queue's own dead-letter arguments still move it (without our reason); either way it never
/// returns to the queue it poisoned.
pub async fn dead_letter(
    publisher: &ConfirmedPublisher,
    topology: &Topology,
    dead_queue: &str,
    delivery: &lapin::message::Delivery,
    reason: &str,
) -> Result<(), BrokerError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let reason: String = reason.chars().take(4000).collect();
    headers.insert(
        ShortString::from(DEAD_REASON_HEADER),
        AMQPValue::LongString(LongString::from(reason)),
    );
    let copied = publisher
        .publish(
            &topology.dead_letter_exchange(),
            dead_queue,
            &delivery.data,
            headers,
        )
        .await;
    match copied {
        Ok(()) => {
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Err(error) => {
            tracing::warn!(%error, "could not publish the dead-letter copy; rejecting instead");
            delivery
                .reject(BasicRejectOptions { requeue: false })
                .await?;
        }
    }
    Ok(())
}

/// Reads the dead-letter reason from a message's headers.
pub fn dead_reason(properties: &BasicProperties) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(DEAD_REASON_HEADER)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_frame_max_is_asked_for_unless_the_url_sets_one() {
        assert_eq!(
            with_default_frame_max("amqp://u:p@h:5672/%2f"),
            "amqp://u:p@h:5672/%2f?frame_max=16384"
        );
        assert_eq!(
            with_default_frame_max("amqp://h/%2f?heartbeat=10"),
            "amqp://h/%2f?heartbeat=10&frame_max=16384"
        );
        assert_eq!(
            with_default_frame_max("amqp://h/%2f?frame_max=131072"),
            "amqp://h/%2f?frame_max=131072"
        );
        // Parsed by lapin's own URI parser as a frame size.
        let uri: lapin::uri::AMQPUri = with_default_frame_max("amqp://h/%2f").parse().unwrap();
        assert_eq!(uri.query.frame_max, Some(16384));
    }

    #[test]
    fn urls_are_masked() {
        assert_eq!(
            mask_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:<masked>@127.0.0.1:5672/%2f"
        );
        assert_eq!(mask_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
