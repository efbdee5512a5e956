//! `chatq-mock-llm`: an OpenAI-compatible mock LLM server for local runs,
//! tests and benchmarks, with configurable latency, streaming and fault
//! injection (globally by rates, or per request by `[mock:...]` directives in
//! the last user message), and provider-style rate limits (max concurrency,
//! requests and tokens per minute) answered with OpenAI's 429s and
//! `x-ratelimit-*` headers.

mod config;
mod faults;
mod handlers;
mod limits;
mod reply;
mod stats;
mod stream;

use std::{
    future::{Future, IntoFuture},
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use axum::{
    Router,
    extract::DefaultBodyLimit,
    routing::{get, post},
};
use tokio_util::sync::CancellationToken;

pub use config::MockConfig;
use limits::Limiter;
use stats::Stats;

/// Largest accepted request body.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// How long [`serve`] waits for open connections after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Shared state of the mock: run-time config, counters and recorded requests.
///
/// Cheap to clone; clones share the same state.
#[derive(Debug, Clone)]
pub struct MockState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RwLock<MockConfig>,
    stats: Arc<Stats>,
    limiter: Arc<Limiter>,
    release_hung: CancellationToken,
}

impl MockState {
    /// Creates a state with the given initial config and empty counters.
    pub fn new(config: MockConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config: RwLock::new(config),
                stats: Arc::new(Stats::default()),
                limiter: Arc::new(Limiter::default()),
                release_hung: CancellationToken::new(),
            }),
        }
    }

    /// The current config.
    pub fn config(&self) -> MockConfig {
        *self
            .inner
            .config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the config after validating it.
    pub fn set_config(&self, config: MockConfig) -> Result<(), String> {
        self.update_config(|_| config).map(|_| ())
    }

    /// Makes every hung request (and any future one) answer 503 so that a
    /// graceful shutdown can complete. Irreversible.
    pub fn release_hung(&self) {
        self.inner.release_hung.cancel();
    }

    /// Applies `f` to the current config; stores and returns the result if valid.
    pub(crate) fn update_config(
        &self,
        f: impl FnOnce(MockConfig) -> MockConfig,
    ) -> Result<MockConfig, String> {
        let mut guard = self
            .inner
            .config
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let new = f(*guard);
        new.validate()?;
        *guard = new;
        Ok(new)
    }

    pub(crate) fn stats(&self) -> &Arc<Stats> {
        &self.inner.stats
    }

    pub(crate) fn limiter(&self) -> &Arc<Limiter> {
        &self.inner.limiter
    }

    /// Resolves once [`MockState::release_hung`] has been called.
    pub(crate) async fn hang_released(&self) {
        self.inner.release_hung.cancelled().await;
    }
}

/// Builds the mock's router (see the crate docs for the routes).
pub fn router(state: MockState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/models", get(handlers::models))
        .route("/_mock/stats", get(handlers::stats))
        .route("/_mock/requests", get(handlers::requests))
        .route(
            "/_mock/config",
            get(handlers::get_config).post(handlers::patch_config),
        )
        .route("/_mock/reset", post(handlers::reset))
        .route("/healthz", get(handlers::healthz))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves the mock on `listener` until `shutdown` resolves.
///
/// On shutdown, hung requests are released (503) and open connections get
/// up to 10 seconds to finish before this returns anyway.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: MockConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = MockState::new(config);
    let token = state.inner.release_hung.clone();
    let signal_token = token.clone();
    // No Nagle: streamed chunks go out as they are written.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down");
            signal_token.cancel();
        })
        .into_future();
    tokio::select! {
        result = server => result,
        () = async {
            token.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("connections still open after the shutdown grace period; exiting");
            Ok(())
        }
    }
}
