//! The confirmed publisher: one lazily (re)connected confirm channel per
//! process, shared by all its requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{QueueError, Topology, connect, open_confirm_channel, publish_on, timed};
use crate::config::AmqpArgs;

/// After a failed connect, callers fail fast for this long instead of each
/// paying the connect timeout again.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

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
    /// A channel without confirms on the same connection, for streamed text.
    events: Option<Channel>,
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
        st.events = None;
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
        self.publish_to(&self.inner.topology.work_queue, job_id)
            .await
    }

    /// Publishes `{job_id}` straight to the dead-letter queue (a job that
    /// failed without a message in hand, e.g. when its worker died on its
    /// last attempt), so operators can inspect and replay it like any other.
    pub async fn publish_dead(&self, job_id: Uuid) -> Result<(), QueueError> {
        self.publish_to(&self.inner.topology.dead_queue, job_id)
            .await
    }

    async fn publish_to(&self, queue: &str, job_id: Uuid) -> Result<(), QueueError> {
        let ch = self.channel().await?;
        let result = publish_on(&ch, queue, job_id).await;
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
        let (queue, wait) = self.inner.topology.retry_queue(delay);
        self.publish_to(queue, job_id).await.map(|()| wait)
    }

    /// Publishes streamed text for `job_id` on the events exchange:
    /// transient and unconfirmed (a lost piece is recovered from the row).
    pub async fn publish_event(&self, job_id: Uuid, body: &[u8]) -> Result<(), QueueError> {
        let ch = self.events_channel().await?;
        let published = timed(ch.basic_publish(
            self.inner.topology.events_exchange.as_str().into(),
            job_id.to_string().as_str().into(),
            BasicPublishOptions::default(),
            body,
            // Transient: a restart loses nothing the row does not hold.
            BasicProperties::default().with_delivery_mode(1),
        ))
        .await;
        if published.is_err() {
            self.inner.state.lock().await.events = None;
        }
        published.map(drop)
    }

    async fn events_channel(&self) -> Result<Channel, QueueError> {
        {
            let st = self.inner.state.lock().await;
            if let Some(ch) = &st.events
                && ch.status().connected()
            {
                return Ok(ch.clone());
            }
        }
        // Connects (or fails fast) like any publish.
        self.channel().await?;
        let mut st = self.inner.state.lock().await;
        let conn = st
            .conn
            .as_ref()
            .ok_or_else(|| QueueError::Unavailable("no broker connection".into()))?;
        let ch = timed(conn.create_channel()).await?;
        st.events = Some(ch.clone());
        Ok(ch)
    }

    /// Whether the broker connection is up (connecting if needed).
    pub async fn is_ready(&self) -> bool {
        self.channel().await.is_ok()
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
