//! One `LISTEN` connection per api process: job state changes go to the
//! [`JobHub`], key revocations empty the [`KeyCache`]. After the connection
//! was lost, both assume they missed something: every waiter re-reads its
//! job, and every cached key is looked up again.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use chatq_common::db::JOB_CHANNEL;
use chatq_common::db::keys::KEY_CHANNEL;

use crate::auth::KeyCache;
use crate::hub::JobHub;

/// Pause before listening again after the listener connection failed.
const RELISTEN_DELAY: Duration = Duration::from_secs(1);

/// Listens in the background until `shutdown`.
pub fn start(pool: PgPool, hub: JobHub, keys: KeyCache, shutdown: CancellationToken) {
    tokio::spawn(async move {
        tokio::select! {
            () = listen_forever(pool, &hub, &keys) => {}
            () = shutdown.cancelled() => {}
        }
    });
}

/// Assumes everything changed: the listener was away.
fn missed_everything(hub: &JobHub, keys: &KeyCache) {
    keys.clear();
    hub.changed_all();
}

async fn listen_forever(pool: PgPool, hub: &JobHub, keys: &KeyCache) {
    loop {
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => {
                if let Err(err) = listener.listen_all([JOB_CHANNEL, KEY_CHANNEL]).await {
                    tracing::warn!(error = %err, "LISTEN failed");
                } else {
                    missed_everything(hub, keys);
                    loop {
                        match listener.try_recv().await {
                            Ok(Some(note)) if note.channel() == KEY_CHANNEL => keys.clear(),
                            Ok(Some(note)) => {
                                if let Ok(id) = Uuid::parse_str(note.payload()) {
                                    hub.changed(id);
                                }
                            }
                            Ok(None) => {
                                tracing::warn!("job listener connection lost; re-listening");
                                missed_everything(hub, keys);
                                break;
                            }
                            Err(err) => {
                                tracing::warn!(error = %err, "job listener failed; re-listening");
                                missed_everything(hub, keys);
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
