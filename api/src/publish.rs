//! The api's side of publishing: publish with confirms, then record the
//! confirm. Records are deferred and batched, off the request path; a lost
//! record only means the recovery relay publishes the job again, which the
//! worker's claim makes harmless.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

use chatq_common::queue::{Publisher, QueueError};

/// Confirmed publishes recorded per UPDATE at most.
const MARK_BATCH: usize = 500;
/// Age at which a confirmed publish is recorded; well below the relay's
/// grace (`CHATQ_RELAY_GRACE_SECS`, 10 s by default), so the relay does
/// not republish jobs that merely wait in the queue.
const MARK_DELAY: Duration = Duration::from_secs(1);

/// Publishes jobs and records, in the background, that they were published.
#[derive(Clone)]
pub struct JobPublisher {
    publisher: Publisher,
    confirmed: mpsc::UnboundedSender<(Uuid, Instant)>,
    /// Whether this process's last publish failed to reach the broker.
    failing: Arc<AtomicBool>,
}

impl JobPublisher {
    /// Starts the recorder, which runs as long as a clone of this value lives.
    pub fn start(publisher: Publisher, db: PgPool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(record_confirms(db, rx));
        Self {
            publisher,
            confirmed: tx,
            failing: Arc::default(),
        }
    }

    /// Publishes the job and waits for the broker's confirm.
    pub async fn publish(&self, job_id: Uuid) -> Result<(), QueueError> {
        let published = self.publisher.publish_job(job_id).await;
        // A refusal (queue full) is an answer: the broker is there.
        self.failing.store(
            matches!(
                published,
                Err(QueueError::Unavailable(_) | QueueError::Amqp(_))
            ),
            Ordering::Relaxed,
        );
        published?;
        let _ = self.confirmed.send((job_id, Instant::now()));
        Ok(())
    }

    /// Whether the last publish of this process could not reach the broker
    /// (so submissions pile up in the outbox until it is back).
    pub fn broker_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// The underlying broker publisher.
    pub fn broker(&self) -> &Publisher {
        &self.publisher
    }
}

/// Runs until every sender is gone (the api stopped serving). A confirm is
/// recorded once it is [`MARK_DELAY`] old: by then most jobs have been
/// claimed by a worker, which takes them out of the relay's sight, so the
/// update finds nothing to write. Only jobs still waiting in the queue (a
/// backlog) cost a write.
async fn record_confirms(db: PgPool, mut rx: mpsc::UnboundedReceiver<(Uuid, Instant)>) {
    let mut pending: VecDeque<(Uuid, Instant)> = VecDeque::new();
    let mut received = Vec::with_capacity(MARK_BATCH);
    let mut open = true;
    while open || !pending.is_empty() {
        let due = pending.front().map(|(_, at)| *at + MARK_DELAY);
        tokio::select! {
            n = rx.recv_many(&mut received, MARK_BATCH), if open => {
                open = n > 0;
                pending.extend(received.drain(..));
            }
            () = chatq_common::time::sleep_until(due) => {}
        }
        let now = Instant::now();
        let mut ids = Vec::new();
        // Once closed, everything left is recorded at once.
        while let Some(&(id, at)) = pending.front()
            && (!open || now >= at + MARK_DELAY)
        {
            ids.push(id);
            pending.pop_front();
        }
        for batch in ids.chunks(MARK_BATCH) {
            if let Err(err) = chatq_common::db::jobs::mark_published_many(&db, batch).await {
                // Not fatal: the relay will publish these jobs again.
                tracing::warn!(error = %err, jobs = batch.len(), "could not record confirmed publishes");
            }
        }
    }
}
