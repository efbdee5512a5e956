//! The api's side of publishing: publish with confirms, then record the
//! confirm. Records are batched into one UPDATE per burst, off the request
//! path; a lost record only means the recovery relay publishes the job
//! again, which the worker's claim makes harmless.

use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use chatq_common::queue::{Publisher, QueueError};

/// Confirmed publishes recorded per UPDATE at most.
const MARK_BATCH: usize = 500;

/// Publishes jobs and records, in the background, that they were published.
#[derive(Clone)]
pub struct JobPublisher {
    publisher: Publisher,
    confirmed: mpsc::UnboundedSender<Uuid>,
}

impl JobPublisher {
    /// Starts the recorder, which runs as long as a clone of this value lives.
    pub fn start(publisher: Publisher, db: PgPool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(record_confirms(db, rx));
        Self {
            publisher,
            confirmed: tx,
        }
    }

    /// Publishes the job and waits for the broker's confirm.
    pub async fn publish(&self, job_id: Uuid) -> Result<(), QueueError> {
        self.publisher.publish_job(job_id).await?;
        let _ = self.confirmed.send(job_id);
        Ok(())
    }

    /// The underlying broker publisher.
    pub fn broker(&self) -> &Publisher {
        &self.publisher
    }
}

/// Runs until every sender is gone (the api stopped serving).
async fn record_confirms(db: PgPool, mut rx: mpsc::UnboundedReceiver<Uuid>) {
    let mut batch = Vec::with_capacity(MARK_BATCH);
    while rx.recv_many(&mut batch, MARK_BATCH).await > 0 {
        if let Err(err) = chatq_common::db::jobs::mark_published_many(&db, &batch).await {
            // Not fatal: the relay will publish these jobs again.
            tracing::warn!(error = %err, jobs = batch.len(), "could not record confirmed publishes");
        }
        batch.clear();
    }
}
