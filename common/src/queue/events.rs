//! The receiving end of streamed text: one exclusive, auto-deleted queue
//! per api process, bound to the events exchange per job that has a
//! subscriber there (routing key = job id), consumed without acks. Nothing
//! here is durable: it is a live view, and the row holds the text too.

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer, ExchangeKind};
use uuid::Uuid;

use super::{QueueError, Topology, connect, timed};
use crate::domain::DeltaEvent;

/// Pieces of text waiting for a slow api process, at most; past it the
/// oldest are dropped (subscribers fill the gap from the row).
const MAX_WAITING_EVENTS: i64 = 10_000;

/// One process's subscription to streamed text.
pub struct EventSubscriber {
    conn: Connection,
    channel: Channel,
    queue: String,
    exchange: String,
    consumer: Consumer,
}

impl EventSubscriber {
    /// Connects, declares the exchange and this process's queue, consumes.
    pub async fn connect(url: &str, topology: &Topology) -> Result<Self, QueueError> {
        let conn = connect(url).await?;
        let channel = timed(conn.create_channel()).await?;
        timed(channel.exchange_declare(
            topology.events_exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(MAX_WAITING_EVENTS),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("drop-head".into()),
        );
        // Server-named, exclusive, auto-deleted: it lives and dies with this process.
        let declared = timed(channel.queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            args,
        ))
        .await?;
        let queue = declared.name().to_string();
        let consumer = timed(channel.basic_consume(
            queue.as_str().into(),
            "chatq-api-events".into(),
            // A live view: nothing to redeliver, so no acks.
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await?;
        Ok(Self {
            conn,
            channel,
            queue,
            exchange: topology.events_exchange.clone(),
            consumer,
        })
    }

    /// Routes the job's text to this process.
    pub async fn bind(&self, job_id: Uuid) -> Result<(), QueueError> {
        timed(self.channel.queue_bind(
            self.queue.as_str().into(),
            self.exchange.as_str().into(),
            job_id.to_string().as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await
    }

    /// Stops routing the job's text here.
    pub async fn unbind(&self, job_id: Uuid) -> Result<(), QueueError> {
        timed(self.channel.queue_unbind(
            self.queue.as_str().into(),
            self.exchange.as_str().into(),
            job_id.to_string().as_str().into(),
            FieldTable::default(),
        ))
        .await
    }

    /// The next piece of text; `Ok(None)` for a message that is not one
    /// (skipped), `Err` when the connection is gone.
    pub async fn next(&mut self) -> Result<Option<DeltaEvent>, QueueError> {
        match self.consumer.next().await {
            Some(Ok(delivery)) => Ok(serde_json::from_slice(&delivery.data).ok()),
            Some(Err(err)) => Err(err.into()),
            None => Err(QueueError::Unavailable("events consumer ended".into())),
        }
    }

    /// Closes the connection (the queue goes with it).
    pub async fn close(self) {
        let _ = timed(self.conn.close(200, "api stopping".into())).await;
    }
}
