//! Follows the operator's pause switch (`POST /admin/v1/queues/pause` and
//! `/resume`), stored in PostgreSQL so every replica sees it.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use chatq_common::db::controls;

/// How often the switch is read.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Reads the switch, then keeps reading it until `stop`; the receiver holds
/// whether consumption is paused. The first read happens before this
/// returns, so a worker started during a pause takes no job; while the
/// database is unreachable the last known state (at first: not paused) holds.
pub async fn watch_pause(db: PgPool, stop: CancellationToken) -> watch::Receiver<bool> {
    let initial = match controls::is_paused(&db).await {
        Ok(paused) => paused,
        Err(err) => {
            tracing::debug!(error = %err, "cannot read the pause switch");
            false
        }
    };
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(POLL_EVERY) => {}
                () = stop.cancelled() => return,
            }
            match controls::is_paused(&db).await {
                Ok(paused) => {
                    tx.send_if_modified(|current| {
                        let changed = *current != paused;
                        *current = paused;
                        changed
                    });
                }
                Err(err) => tracing::debug!(error = %err, "cannot read the pause switch"),
            }
        }
    });
    rx
}
