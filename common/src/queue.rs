//! RabbitMQ topology and the confirmed publisher.
//!
//! Every name starts with `CHATQ_QUEUE_PREFIX`. The work queue is a durable
//! quorum queue with a maximum length that rejects (never drops) overflow
//! and dead-letters at-least-once to `<prefix>.dead`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::config::AmqpArgs;
use crate::domain::QueueMessage;

/// Longest wait for a TCP+AMQP handshake with the broker.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for any single broker operation, publisher confirms
/// included: lapin can wait forever when the server goes away.
pub const BROKER_OP_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed connect, callers fail fast for this long instead of each
/// paying the connect timeout again.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);
/// Deliveries of one message (crashes, requeues) before the broker
/// dead-letters it; the database recovery loop still owns the job.
const DELIVERY_LIMIT: i64 = 20;
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

/// The names of the exchanges and queues of one deployment.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Queue the workers consume.
    pub work_queue: String,
    /// Exchange that dead-lettered messages go to.
    pub dead_exchange: String,
    /// Queue holding dead letters for inspection and replay.
    pub dead_queue: String,
    /// Maximum length of the work queue.
    pub max_length: u32,
    /// Delay queues for retries, shortest first: a message waits out the
    /// queue's TTL, then is dead-lettered back to the work queue.
    pub retry_queues: Vec<(Duration, String)>,
}

/// The delays a retry can wait in the broker (a retry waits in the
/// shortest one at least as long as its backoff).
pub const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_secs(2),
    Duration::from_secs(10),
    Duration::from_secs(60),
];

impl Topology {
    /// The topology for these settings.
    pub fn new(args: &AmqpArgs) -> Self {
        Self::with_prefix(&args.queue_prefix, args.max_queue_length)
    }

    /// The topology under `prefix` whose work queue holds at most `max_length`.
    pub fn with_prefix(p: &str, max_length: u32) -> Self {
        Self {
            work_queue: format!("{p}.work"),
            dead_exchange: format!("{p}.dlx"),
            dead_queue: format!("{p}.dead"),
            max_length,
            retry_queues: RETRY_DELAYS
                .iter()
                .map(|d| (*d, format!("{p}.retry.{}s", d.as_secs())))
                .collect(),
        }
    }

    /// Deletes every queue and the exchange of this topology, messages
    /// included (tests, benchmarks, tearing a deployment down).
    pub async fn delete(&self, ch: &Channel) -> Result<(), QueueError> {
        let retry = self.retry_queues.iter().map(|(_, name)| name);
        for queue in [&self.work_queue, &self.dead_queue]
            .into_iter()
            .chain(retry)
        {
            timed(ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())).await?;
        }
        timed(ch.exchange_delete(
            self.dead_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        ))
        .await?;
        Ok(())
    }

    /// The delay queue for a retry after `delay`, and how long it waits.
    pub fn retry_queue(&self, delay: Duration) -> (&str, Duration) {
        let (wait, name) = self
            .retry_queues
            .iter()
            .find(|(d, _)| *d >= delay)
            .or(self.retry_queues.last())
            .expect("there is at least one retry queue");
        (name, *wait)
    }

    /// Declares everything, idempotently (every process does it at connect).
    pub async fn declare(&self, ch: &Channel) -> Result<(), QueueError> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        timed(ch.exchange_declare(
            self.dead_exchange.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await?;
        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), str_value("quorum"));
        timed(ch.queue_declare(self.dead_queue.as_str().into(), durable, dead_args)).await?;
        timed(ch.queue_bind(
            self.dead_queue.as_str().into(),
            self.dead_exchange.as_str().into(),
            self.dead_queue.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await?;

        let mut work_args = FieldTable::default();
        // Quorum: replicated and durable; required for at-least-once dead-lettering.
        work_args.insert("x-queue-type".into(), str_value("quorum"));
        // Bounded backlog: overflow is refused to the publisher (a nack), never dropped.
        work_args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(i64::from(self.max_length)),
        );
        work_args.insert("x-overflow".into(), str_value("reject-publish"));
        // Dead letters must not be lost on the way to the dead queue.
        work_args.insert("x-dead-letter-strategy".into(), str_value("at-least-once"));
        work_args.insert(
            "x-dead-letter-exchange".into(),
            str_value(&self.dead_exchange),
        );
        work_args.insert(
            "x-dead-letter-routing-key".into(),
            str_value(&self.dead_queue),
        );
        // Quorum queues have no default delivery limit on 3.10: a message that
        // crashes every consumer would otherwise loop forever.
        work_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        timed(ch.queue_declare(self.work_queue.as_str().into(), durable, work_args)).await?;

        for (delay, name) in &self.retry_queues {
            let mut args = FieldTable::default();
            // Quorum with at-least-once dead-lettering: a waiting retry
            // survives a broker restart and is not dropped on its way back.
            args.insert("x-queue-type".into(), str_value("quorum"));
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            );
            args.insert("x-overflow".into(), str_value("reject-publish"));
            args.insert("x-dead-letter-strategy".into(), str_value("at-least-once"));
            args.insert("x-dead-letter-exchange".into(), str_value(""));
            args.insert(
                "x-dead-letter-routing-key".into(),
                str_value(&self.work_queue),
            );
            timed(ch.queue_declare(name.as_str().into(), durable, args)).await?;
        }
        Ok(())
    }
}

fn str_value(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
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

/// Publishes job messages with publisher confirms over one lazily
/// (re)connected channel, shared by all requests of a process.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<PublisherInner>,
}

struct PublisherInner {
    url: String,
    topology: Topology,
    state: Mutex<PublisherState>,
}

#[derive(Default)]
struct PublisherState {
    conn: Option<Connection>,
    channel: Option<Channel>,
    last_failure: Option<Instant>,
}

impl Publisher {
    /// A publisher for these settings; it connects on first use.
    pub fn new(args: &AmqpArgs) -> Self {
        Self {
            inner: Arc::new(PublisherInner {
                url: args.amqp_url.clone(),
                topology: Topology::new(args),
                state: Mutex::new(PublisherState::default()),
            }),
        }
    }

    /// The topology it publishes to.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// A connected confirm channel, reconnecting if needed.
    pub async fn channel(&self) -> Result<Channel, QueueError> {
        let mut st = self.inner.state.lock().await;
        if let Some(ch) = &st.channel
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        if let Some(at) = st.last_failure
            && at.elapsed() < RECONNECT_BACKOFF
        {
            return Err(QueueError::Unavailable(
                "broker recently unreachable".into(),
            ));
        }
        if let Some(old) = st.conn.take() {
            // Best effort: the old connection is already broken.
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                old.close(0, "reconnecting".into()),
            )
            .await;
        }
        st.channel = None;
        let opened = async {
            let conn = connect(&self.inner.url).await?;
            let ch = open_confirm_channel(&conn, &self.inner.topology).await?;
            Ok::<_, QueueError>((conn, ch))
        }
        .await;
        match opened {
            Ok((conn, ch)) => {
                st.conn = Some(conn);
                st.channel = Some(ch.clone());
                st.last_failure = None;
                Ok(ch)
            }
            Err(e) => {
                st.last_failure = Some(Instant::now());
                Err(e)
            }
        }
    }

    /// Publishes `{job_id}` and waits for the broker's confirm. `Full` when
    /// the broker refused it because the work queue is at its maximum.
    pub async fn publish_job(&self, job_id: Uuid) -> Result<(), QueueError> {
        let ch = self.channel().await?;
        let result = publish_on(&ch, &self.inner.topology.work_queue, job_id).await;
        if matches!(
            result,
            Err(QueueError::Unavailable(_) | QueueError::Amqp(_))
        ) {
            // Drop the channel so the next publish reconnects.
            self.inner.state.lock().await.channel = None;
        }
        result
    }

    /// Publishes `{job_id}` to the delay queue for `delay`, from which the
    /// broker returns it to the work queue; returns the actual wait.
    pub async fn publish_delayed(
        &self,
        job_id: Uuid,
        delay: Duration,
    ) -> Result<Duration, QueueError> {
        let ch = self.channel().await?;
        let (queue, wait) = self.inner.topology.retry_queue(delay);
        let result = publish_on(&ch, queue, job_id).await;
        if matches!(
            result,
            Err(QueueError::Unavailable(_) | QueueError::Amqp(_))
        ) {
            self.inner.state.lock().await.channel = None;
        }
        result.map(|()| wait)
    }

    /// Whether the broker connection is up (connecting if needed).
    pub async fn is_ready(&self) -> bool {
        self.channel().await.is_ok()
    }
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

/// Message and consumer counts of the work and dead-letter queues.
#[derive(Debug, Clone, Copy)]
pub struct QueueDepths {
    /// Messages ready in the work queue.
    pub work_messages: u32,
    /// Consumers of the work queue.
    pub work_consumers: u32,
    /// Messages in the dead-letter queue.
    pub dead_messages: u32,
}

impl Publisher {
    /// Reads the queue depths with passive declares.
    pub async fn depths(&self) -> Result<QueueDepths, QueueError> {
        let ch = self.channel().await?;
        let t = &self.inner.topology;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let work =
            timed(ch.queue_declare(t.work_queue.as_str().into(), passive, FieldTable::default()))
                .await?;
        let dead =
            timed(ch.queue_declare(t.dead_queue.as_str().into(), passive, FieldTable::default()))
                .await?;
        Ok(QueueDepths {
            work_messages: work.message_count(),
            work_consumers: work.consumer_count(),
            dead_messages: dead.message_count(),
        })
    }
}
