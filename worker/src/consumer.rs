//! The consumer: one channel with prefetch = concurrency, a task per
//! delivery, acks on the delivering channel after the job's commit, and a
//! reconnect loop that re-declares the topology and re-creates the
//! consumer (prefetch included) whenever the broker comes back.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use chatq_common::domain::QueueMessage;
use chatq_common::queue::{self, JOB_ID_HEADER, Topology, timed};

use crate::runner::{JobContext, Outcome, run_job};

/// Longest pause between reconnect attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// Longest wait for the rest of a cancelled consumer's deliveries.
const CANCEL_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often `--drain` checks whether the queue is empty.
const DRAIN_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Why consuming stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Shutdown was requested.
    Shutdown,
    /// `--drain` found the queue empty and nothing in flight.
    Drained,
}

/// Consumes until `shutdown` (or, with `drain`, until the queue is empty),
/// spawning each job on `tracker`.
pub async fn consume(
    ctx: Arc<JobContext>,
    topology: Topology,
    tracker: TaskTracker,
    abandon: CancellationToken,
    shutdown: CancellationToken,
    drain: bool,
) -> Stop {
    let mut delay = Duration::from_millis(100);
    loop {
        if shutdown.is_cancelled() {
            return Stop::Shutdown;
        }
        match consume_once(&ctx, &topology, &tracker, &abandon, &shutdown, drain).await {
            Ok(stop) => return stop,
            Err(err) => {
                tracing::warn!(error = %err, "consumer lost its broker connection; reconnecting")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Stop::Shutdown,
        }
        delay = (delay * 2).min(MAX_RECONNECT_DELAY);
    }
}

async fn consume_once(
    ctx: &Arc<JobContext>,
    topology: &Topology,
    tracker: &TaskTracker,
    abandon: &CancellationToken,
    shutdown: &CancellationToken,
    drain: bool,
) -> Result<Stop, queue::QueueError> {
    let conn = queue::connect(&ctx.config.amqp.amqp_url).await?;
    let prefetch = ctx.config.concurrency;
    let channel = queue::open_consumer_channel(&conn, topology, prefetch).await?;
    let mut paused = ctx.paused.clone();
    let mut consumer = None;
    if !*paused.borrow_and_update() {
        consumer = Some(start_consuming(&channel, topology).await?);
    } else {
        tracing::info!("consumption is paused by an operator; waiting for resume");
    }
    tracing::info!(queue = %topology.work_queue, prefetch, "connected");
    let mut drain_tick = tokio::time::interval(DRAIN_CHECK_INTERVAL);
    let mut empty_checks = 0;
    let stop = loop {
        tokio::select! {
            next = next_delivery(&mut consumer) => match next {
                Some(Ok(delivery)) => {
                    tracker.spawn(handle_delivery(ctx.clone(), delivery, abandon.clone()));
                }
                Some(Err(err)) => return Err(err.into()),
                None => return Err(queue::QueueError::Unavailable("consumer cancelled by the broker".into())),
            },
            () = pause_changed(&mut paused) => {
                let now_paused = *paused.borrow_and_update();
                consumer = match (now_paused, consumer.take()) {
                    (true, Some(running)) => {
                        stop_consuming(&channel, running, ctx, tracker, abandon).await;
                        tracing::info!(in_flight = tracker.len(), "paused by an operator: no new jobs; in-flight jobs finish");
                        None
                    }
                    (false, None) => {
                        tracing::info!("resumed by an operator");
                        Some(start_consuming(&channel, topology).await?)
                    }
                    (_, unchanged) => unchanged,
                };
            }
            () = shutdown.cancelled() => break Stop::Shutdown,
            _ = drain_tick.tick(), if drain => {
                let passive = QueueDeclareOptions { passive: true, ..Default::default() };
                let ready = timed(channel.queue_declare(topology.work_queue.as_str().into(), passive, FieldTable::default()))
                    .await?
                    .message_count();
                // Two empty looks in a row with nothing in flight: done.
                empty_checks = if ready == 0 && tracker.is_empty() { empty_checks + 1 } else { 0 };
                if empty_checks >= 2 {
                    break Stop::Drained;
                }
            }
        }
    };
    // Stop taking new messages; in-flight jobs keep their channel to ack on.
    if let Some(running) = consumer {
        stop_consuming(&channel, running, ctx, tracker, abandon).await;
    }
    tracing::info!(in_flight = tracker.len(), "stopped consuming");
    // The connection must outlive the in-flight jobs, which ack on it.
    let conn_holder = conn;
    tracker.close();
    tracker.wait().await;
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        conn_holder.close(200, "worker stopping".into()),
    )
    .await;
    Ok(stop)
}

/// A running consumer and its tag.
struct Running {
    consumer: Consumer,
    tag: String,
}

async fn start_consuming(
    channel: &Channel,
    topology: &Topology,
) -> Result<Running, queue::QueueError> {
    let tag = format!("chatq-worker-{}", Uuid::new_v4());
    let consumer = timed(channel.basic_consume(
        topology.work_queue.as_str().into(),
        tag.as_str().into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await?;
    tracing::info!(queue = %topology.work_queue, "consuming");
    Ok(Running { consumer, tag })
}

/// Cancels the consumer, then hands what the broker had already delivered
/// to it to jobs as usual, so no message stays unacknowledged on a channel
/// that lives on (while paused).
async fn stop_consuming(
    channel: &Channel,
    mut running: Running,
    ctx: &Arc<JobContext>,
    tracker: &TaskTracker,
    abandon: &CancellationToken,
) {
    if let Err(err) =
        timed(channel.basic_cancel(running.tag.as_str().into(), BasicCancelOptions::default()))
            .await
    {
        tracing::warn!(error = %err, "could not cancel the consumer");
        return;
    }
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(CANCEL_DRAIN_TIMEOUT, running.consumer.next()).await
    {
        tracker.spawn(handle_delivery(ctx.clone(), delivery, abandon.clone()));
    }
}

async fn next_delivery(consumer: &mut Option<Running>) -> Option<Result<Delivery, lapin::Error>> {
    match consumer {
        Some(running) => running.consumer.next().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the pause flag changes (never, once its watcher is gone).
async fn pause_changed(paused: &mut watch::Receiver<bool>) {
    if paused.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn header_job_id(delivery: &Delivery) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(JOB_ID_HEADER)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        _ => None,
    }
}

async fn handle_delivery(ctx: Arc<JobContext>, delivery: Delivery, abandon: CancellationToken) {
    let message: QueueMessage = match serde_json::from_slice(&delivery.data) {
        Ok(m) => m,
        Err(err) => {
            tracing::warn!(error = %err, header_job_id = ?header_job_id(&delivery), "unparseable message; dead-lettering");
            settle(&delivery, Settle::DeadLetter).await;
            return;
        }
    };
    let hint = message.job_id();
    let span = crate::span::job_span(hint);
    async {
        let settle_as = match run_job(&ctx, hint, &abandon).await {
            Ok(Outcome::Done) => Settle::Ack,
            Ok(Outcome::UnknownJob) => {
                tracing::warn!("message names no job; dead-lettering");
                Settle::DeadLetter
            }
            Ok(Outcome::Released) => Settle::Requeue,
            Ok(Outcome::Failed(job)) if job == hint => Settle::DeadLetter,
            // The message started another job than its own: dead-letter
            // that job by name; the message itself is spent.
            Ok(Outcome::Failed(job)) => match ctx.publisher.publish_dead(job).await {
                Ok(()) => Settle::Ack,
                Err(err) => {
                    tracing::warn!(error = %err, "could not dead-letter the failed job; requeueing the message");
                    Settle::Requeue
                }
            },
            Err(err) => {
                // The database stayed away past the retry budget: requeue; the
                // lease (if claimed) lapses and recovery takes the job over.
                tracing::error!(error = %err, "job could not be handled; requeueing");
                Settle::Requeue
            }
        };
        if matches!(settle_as, Settle::Ack) && failpoint_exit_before_ack() {
            tracing::error!("failpoint exit_before_ack: exiting after the commit, before the ack");
            std::process::exit(3);
        }
        settle(&delivery, settle_as).await;
    }
    .instrument(span)
    .await;
}

/// Fault injection for tests: `CHATQ_FAILPOINT=exit_before_ack` makes the
/// worker die right after a job's result is committed and before its
/// message is acked, as a crash or connection reset at that instant would.
fn failpoint_exit_before_ack() -> bool {
    static FAILPOINT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAILPOINT
        .get_or_init(|| std::env::var("CHATQ_FAILPOINT").is_ok_and(|v| v == "exit_before_ack"))
}

#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack,
    Requeue,
    DeadLetter,
}

async fn settle(delivery: &Delivery, how: Settle) {
    let result = match how {
        Settle::Ack => timed(delivery.acker.ack(BasicAckOptions::default())).await,
        Settle::Requeue => {
            timed(delivery.acker.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            }))
            .await
        }
        Settle::DeadLetter => {
            timed(delivery.acker.nack(BasicNackOptions {
                requeue: false,
                ..Default::default()
            }))
            .await
        }
    };
    if let Err(err) = result {
        // The broker redelivers an unsettled message; the claim makes that harmless.
        tracing::warn!(error = %err, ?how, "could not settle the message");
    }
}
