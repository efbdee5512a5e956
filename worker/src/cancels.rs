//! The worker's one `LISTEN` connection: cancellations here, the LLM
//! budget's releases and pauses handed to [`Budget`].
//!
//! Prompt cancellation: `POST /v1/jobs/{id}/cancel` and deleting a
//! conversation announce the job on [`CANCEL_CHANNEL`]; each worker listens
//! and stops the LLM call of a job it is running at once, instead of at its
//! next heartbeat. The heartbeat stays the backstop (a missed notification
//! costs at most a heartbeat interval).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chatq_common::sync::lock;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use chatq_common::db::llm_budget::{PAUSE_CHANNEL, RELEASE_CHANNEL};
use chatq_common::db::{CANCEL_CHANNEL, KEY_SLOT_CHANNEL};

use crate::budget::Budget;

/// Pause before listening again after the listener connection failed.
const RELISTEN_DELAY: Duration = Duration::from_secs(1);

type Running = Arc<Mutex<HashMap<Uuid, CancellationToken>>>;

/// The jobs this process is calling the LLM for, by id.
#[derive(Clone, Default)]
pub struct CancelWatch {
    running: Running,
    /// Woken when a key with `max_concurrency` frees a slot.
    slots: Arc<Notify>,
}

/// Keeps a job registered while it lives.
pub struct Registration {
    id: Uuid,
    running: Running,
}

impl CancelWatch {
    /// Listens until `stop`, on one connection for the process: its own
    /// channel and the LLM budget's (releases and pauses go to `budget`).
    pub fn start(db: PgPool, budget: Arc<Budget>, stop: CancellationToken) -> Self {
        let watch = Self::default();
        let running = watch.running.clone();
        let slots = watch.slots.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = listen(db, running, slots, budget) => {}
                () = stop.cancelled() => {}
            }
        });
        watch
    }

    /// Resolves when a key with `max_concurrency` may have freed a slot
    /// (one waiter per announcement).
    pub async fn slot_freed(&self) {
        self.slots.notified().await;
    }

    /// While the returned registration lives, a cancellation of `id`
    /// cancels `token`.
    pub fn register(&self, id: Uuid, token: CancellationToken) -> Registration {
        lock(&self.running).insert(id, token);
        Registration {
            id,
            running: self.running.clone(),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.running).remove(&self.id);
    }
}

async fn listen(db: PgPool, running: Running, slots: Arc<Notify>, budget: Arc<Budget>) {
    let channels = [
        CANCEL_CHANNEL,
        KEY_SLOT_CHANNEL,
        RELEASE_CHANNEL,
        PAUSE_CHANNEL,
    ];
    loop {
        match PgListener::connect_with(&db).await {
            Ok(mut listener) => match listener.listen_all(channels).await {
                Ok(()) => {
                    budget.relistened().await;
                    loop {
                        match listener.try_recv().await {
                            Ok(Some(note)) if note.channel() == CANCEL_CHANNEL => {
                                if let Ok(id) = Uuid::parse_str(note.payload())
                                    && let Some(token) = lock(&running).get(&id)
                                {
                                    tracing::info!(job_id = %id, "cancelled: stopping its LLM call");
                                    token.cancel();
                                }
                            }
                            // One waiter per slot freed (the others keep waiting).
                            Ok(Some(note)) if note.channel() == KEY_SLOT_CHANNEL => {
                                slots.notify_one()
                            }
                            Ok(Some(note)) => budget.notified(note.channel(), note.payload()),
                            Ok(None) => break,
                            Err(err) => {
                                tracing::debug!(error = %err, "listener failed");
                                break;
                            }
                        }
                    }
                }
                Err(err) => tracing::debug!(error = %err, "LISTEN failed"),
            },
            Err(err) => tracing::debug!(error = %err, "cannot open the listener"),
        }
        tokio::time::sleep(RELISTEN_DELAY).await;
    }
}
