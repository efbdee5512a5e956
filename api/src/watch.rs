//! Wakes long-polls (and event streams) when a job changes, across api
//! replicas: workers and the api announce every change with PostgreSQL
//! `NOTIFY`, one `LISTEN` connection per process fans it out. A waiter holds
//! no database connection while it waits. The same connection hears key
//! revocations and empties the api's key cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use chatq_common::db::JOB_CHANNEL;
use chatq_common::db::keys::KEY_CHANNEL;

use crate::auth::KeyCache;

/// Pause before re-listening after the listener connection failed.
const RELISTEN_DELAY: Duration = Duration::from_secs(1);

type Registry = Arc<Mutex<HashMap<Uuid, broadcast::Sender<()>>>>;

/// The process-wide registry of waiters, fed by one `LISTEN` connection.
#[derive(Clone, Default)]
pub struct JobWatcher {
    waiters: Registry,
}

/// A waiter's handle: `changed()` resolves when its job may have changed.
pub struct JobSubscription {
    id: Uuid,
    rx: broadcast::Receiver<()>,
    waiters: Registry,
}

impl JobWatcher {
    /// Starts listening in the background until `shutdown`.
    /// Key revocations announced by any replica empty `keys`.
    pub fn start(pool: PgPool, keys: KeyCache, shutdown: CancellationToken) -> Self {
        let watcher = Self::default();
        let registry = watcher.waiters.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = listen_forever(pool, registry, keys) => {}
                () = shutdown.cancelled() => {}
            }
        });
        watcher
    }

    /// Registers interest in a job. Subscribe before reading the job, so a
    /// change between the read and the wait is not missed.
    pub fn subscribe(&self, id: Uuid) -> JobSubscription {
        let mut waiters = lock(&self.waiters);
        let rx = waiters
            .entry(id)
            .or_insert_with(|| broadcast::channel(1).0)
            .subscribe();
        JobSubscription {
            id,
            rx,
            waiters: self.waiters.clone(),
        }
    }
}

impl JobSubscription {
    /// Waits for the next announcement about the job (or a listener
    /// reconnect, after which every waiter re-reads).
    pub async fn changed(&mut self) {
        // Lagged means several wake-ups were merged: still a wake-up.
        let _ = self.rx.recv().await;
    }
}

impl Drop for JobSubscription {
    fn drop(&mut self) {
        let mut waiters = lock(&self.waiters);
        // This subscription's receiver is still alive here: 1 means it is the last.
        if waiters
            .get(&self.id)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            waiters.remove(&self.id);
        }
    }
}

fn lock(registry: &Registry) -> std::sync::MutexGuard<'_, HashMap<Uuid, broadcast::Sender<()>>> {
    // A panic while holding this lock cannot leave the map inconsistent.
    registry
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn wake_all(registry: &Registry) {
    for tx in lock(registry).values() {
        let _ = tx.send(());
    }
}

async fn listen_forever(pool: PgPool, registry: Registry, keys: KeyCache) {
    loop {
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => {
                if let Err(err) = listener.listen_all([JOB_CHANNEL, KEY_CHANNEL]).await {
                    tracing::warn!(error = %err, "LISTEN failed");
                } else {
                    // Anything announced while we were not listening was missed.
                    keys.clear();
                    wake_all(&registry);
                    loop {
                        match listener.try_recv().await {
                            Ok(Some(note)) if note.channel() == KEY_CHANNEL => keys.clear(),
                            Ok(Some(note)) => {
                                if let Ok(id) = Uuid::parse_str(note.payload())
                                    && let Some(tx) = lock(&registry).get(&id)
                                {
                                    let _ = tx.send(());
                                }
                            }
                            Ok(None) => {
                                tracing::warn!("job listener connection lost; re-listening");
                                wake_all(&registry);
                                break;
                            }
                            Err(err) => {
                                tracing::warn!(error = %err, "job listener failed; re-listening");
                                wake_all(&registry);
                                break;
                            }
                        }
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot open the job listener"),
        }
        tokio::time::sleep(RELISTEN_DELAY).await;
    }
}
