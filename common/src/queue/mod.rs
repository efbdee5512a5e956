//! RabbitMQ: the topology (`topology`), the confirmed publisher
//! (`publisher`), dead-letter replay (`dead_letters`), and the primitives
//! they share.
//!
//! Every name starts with `CHATQ_QUEUE_PREFIX`. The work queue is a durable
//! quorum queue with a maximum length that rejects (never drops) overflow
//! and dead-letters at-least-once to `<prefix>.dead`.

mod dead_letters;
mod events;
mod publisher;
mod topology;

use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use uuid::Uuid;

use crate::domain::QueueMessage;

pub use dead_letters::{DeadLetterDecision, ReplayError, replay_dead_letters};
pub use events::EventSubscriber;
pub use publisher::{Publisher, QueueDepths};
pub use topology::{RETRY_DELAYS, Topology};

/// Longest wait for a TCP+AMQP handshake with the broker.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for any single broker operation, publisher confirms
/// included: lapin can wait forever when the server goes away.
pub const BROKER_OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Header carrying the job id, for tracing across the queue.
pub const JOB_ID_HEADER: &str = "x-chatq-job-id";

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The broker could not be reached or did not answer in time.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused the message: the work queue is at its maximum length.
    #[error("work queue is full")]
    Full,
    /// A protocol-level error.
    #[error("broker error: {0}")]
    Amqp(#[from] lapin::Error),
}

/// Awaits a broker operation with [`BROKER_OP_TIMEOUT`].
pub async fn timed<T>(fut: impl Future<Output = lapin::Result<T>>) -> Result<T, QueueError> {
    match tokio::time::timeout(BROKER_OP_TIMEOUT, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(QueueError::Unavailable(
            "broker did not answer in time".into(),
        )),
    }
}

/// Connects to the broker, bounded by [`CONNECT_TIMEOUT`].
pub async fn connect(url: &str) -> Result<Connection, QueueError> {
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(QueueError::Unavailable(e.to_string())),
        Err(_) => Err(QueueError::Unavailable("connect timed out".into())),
    }
}

/// Opens a channel with publisher confirms and the topology declared.
pub async fn open_confirm_channel(
    conn: &Connection,
    topology: &Topology,
) -> Result<Channel, QueueError> {
    let ch = timed(conn.create_channel()).await?;
    timed(ch.confirm_select(ConfirmSelectOptions::default())).await?;
    topology.declare(&ch).await?;
    Ok(ch)
}

/// Opens a consuming channel: topology declared and prefetch set, so the
/// broker never hands one process more than `prefetch` unacked messages.
pub async fn open_consumer_channel(
    conn: &Connection,
    topology: &Topology,
    prefetch: u16,
) -> Result<Channel, QueueError> {
    let ch = timed(conn.create_channel()).await?;
    topology.declare(&ch).await?;
    timed(ch.basic_qos(prefetch, BasicQosOptions::default())).await?;
    Ok(ch)
}

/// The AMQP properties of a job message: persistent, JSON, id in a header.
pub fn job_properties(job_id: Uuid) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        JOB_ID_HEADER.into(),
        AMQPValue::LongString(job_id.to_string().into()),
    );
    BasicProperties::default()
        // Persistent: survives a broker restart.
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(job_id.to_string()))
        .with_headers(headers)
}

/// Publishes one job message to `queue` on `ch` and awaits its confirm.
pub async fn publish_on(ch: &Channel, queue: &str, job_id: Uuid) -> Result<(), QueueError> {
    let body = serde_json::to_vec(&QueueMessage::ChatV1 { job_id })
        .map_err(|e| QueueError::Unavailable(format!("encoding message: {e}")))?;
    let confirm = timed(ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        &body,
        job_properties(job_id),
    ))
    .await?;
    match timed(confirm).await? {
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
        Confirmation::Nack(_) => Err(QueueError::Full),
    }
}
