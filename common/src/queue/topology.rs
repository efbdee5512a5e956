//! The exchanges and queues of one deployment, all named under
//! `CHATQ_QUEUE_PREFIX`. The work queue is a durable quorum queue with a
//! maximum length that rejects (never drops) overflow and dead-letters
//! at-least-once to `<prefix>.dead`.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use super::{QueueError, timed};
use crate::config::AmqpArgs;

/// Deliveries of one message (crashes, requeues) before the broker
/// dead-letters it; the database recovery loop still owns the job.
const DELIVERY_LIMIT: i64 = 20;

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
    /// Topic exchange for streamed text, routing key = job id.
    pub events_exchange: String,
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
            events_exchange: format!("{p}.events"),
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
        for exchange in [&self.dead_exchange, &self.events_exchange] {
            timed(ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()))
                .await?;
        }
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
        // Streamed text is a live view, not a record (the row is the truth,
        // and the worker saves the text there too): a non-durable exchange,
        // transient messages, no confirms, so a delta costs the broker one
        // in-memory route per interested api process.
        timed(ch.exchange_declare(
            self.events_exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ))
        .await?;
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
