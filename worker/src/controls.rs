//! Follows the operator's pause switch (`POST /admin/v1/queues/pause` and
//! `/resume`), stored in PostgreSQL so every replica sees it.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use chatq_common::db::controls;

/// How often the switch is read.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Starts reading the switch until `stop`; the receiver holds whether
/// consumption is paused. While the database is unreachable the last known
/// state holds.
pub fn watch_pause(db: PgPool, stop: CancellationToken) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        loop {
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
            tokio::select! {
                () = tokio::time::sleep(POLL_EVERY) => {}
                () = stop.cancelled() => return,
            }
        }
    });
    rx
}
