//! Small timing helpers shared by the api and the worker.

use tokio::time::Instant;

/// Sleeps until `at`, or forever when there is nothing to wait for: the
/// optional timer of a `select!` loop.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
