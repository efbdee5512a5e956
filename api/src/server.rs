//! Serving HTTP to clients that may be hostile: hyper's HTTP/1 connection
//! with a header-read (and keep-alive idle) timeout, a cap on open
//! connections, and per-request load shedding and a handling timeout.
//! Nothing a client does (send nothing, send half a request, idle forever,
//! announce a terabyte) keeps a socket or a request slot for long.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ApiConfig;
use crate::error::ApiError;

/// Largest request head (request line and headers), and the read buffer of
/// each connection, in bytes. hyper's default buffer (~400 KiB) would let
/// 10,000 slow clients pin gigabytes with half-sent headers; a larger head
/// is answered 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How long a closed connection keeps reading (and dropping) what the client
/// still sends. Closing a socket with unread input makes the kernel send a
/// reset, which can destroy the answer the client has not read yet (a 413
/// sent before the body arrived would read as "connection reset"); nginx's
/// lingering close and Go's net/http wait the same way.
const LINGER: Duration = Duration::from_secs(2);
/// Pause after an accept error that is not about one connection (e.g. out of
/// file descriptors), so the loop does not spin while nothing can be accepted.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Repeated warnings (connections refused, requests shed) are logged at most
/// this often, with a count.
const WARN_EVERY: Duration = Duration::from_secs(1);
/// File descriptors kept for everything but client connections: listener,
/// database pool, broker, logs.
const FD_RESERVE: usize = 256;

/// Connection-level settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Most open client connections; past it new ones are closed at once.
    pub max_connections: usize,
    /// Longest wait for a complete request head, including the idle time of
    /// a keep-alive connection before its next request.
    pub header_read_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits `config` sets.
    pub fn new(config: &ApiConfig) -> Self {
        Self {
            max_connections: config.max_connections as usize,
            header_read_timeout: config.header_read_timeout,
        }
    }
}

/// Accepts connections until `shutdown`, then stops accepting and lets the
/// open connections finish their in-flight requests (idle ones close at
/// once). The caller bounds that wait.
pub async fn run(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let max_connections = within_fd_limit(limits.max_connections);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        // hyper starts this timer whenever it waits for a request head: on a
        // new connection and again as soon as a response is written and the
        // connection goes idle (proto/h1/conn.rs, `State::idle`). So it is
        // also the keep-alive idle timeout.
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES);
    let http = Arc::new(http);
    let slots = Arc::new(Semaphore::new(max_connections));
    let connections = TaskTracker::new();
    let mut refused = Throttle::default();
    let mut accept_errors = Throttle::default();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            // No Nagle: a small SSE event must not wait for the client's
            // delayed ACK (it cost 40 ms of time to first token).
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                stream
            }
            // The client went away between connect and accept.
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                if let Some(count) = accept_errors.tick() {
                    tracing::warn!(error = %err, count, "accepting a connection failed");
                }
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Accepted and closed at once, so the kernel's backlog never
            // fills and the client learns right away.
            drop(stream);
            if let Some(count) = refused.tick() {
                tracing::warn!(
                    max_connections,
                    refused = count,
                    "connection limit reached; closing new connections"
                );
            }
            continue;
        };
        let conn = serve_connection(stream, Arc::clone(&http), app.clone(), shutdown.clone());
        connections.spawn(async move {
            conn.await;
            drop(slot);
        });
    }
    // New connections are now refused by the kernel.
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Serves one connection, then closes it without losing the last answer.
async fn serve_connection(
    mut stream: TcpStream,
    http: Arc<http1::Builder>,
    app: Router,
    shutdown: CancellationToken,
) {
    let served = {
        let conn = http.serve_connection(TokioIo::new(&mut stream), TowerToHyperService::new(app));
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            served = conn.as_mut() => served,
            () = shutdown.cancelled() => {
                // Finish the request in flight, if any, then close.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(err) = served {
        // Timeouts, resets and malformed requests: routine on a public port.
        tracing::debug!(error = %err, "connection ended with an error");
    }
    linger(stream).await;
}

/// Half-closes `stream` (the client reads end-of-stream after our last
/// answer) and drops what it still sends for up to [`LINGER`], so that
/// closing does not reset the connection under an unread answer.
async fn linger(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = tokio::io::sink();
    let _ = tokio::time::timeout(LINGER, tokio::io::copy(&mut stream, &mut sink)).await;
}

/// Errors that concern one connection only; the next accept may succeed.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// `max_connections`, lowered (with a warning) when the process's open-file
/// limit could not hold that many sockets: past the limit accept fails and
/// nothing, not even `/healthz`, is answered.
fn within_fd_limit(max_connections: usize) -> usize {
    let Some(limit) = open_file_limit() else {
        return max_connections;
    };
    let usable = limit.saturating_sub(FD_RESERVE).max(1);
    if max_connections <= usable {
        return max_connections;
    }
    tracing::warn!(
        max_connections,
        open_file_limit = limit,
        using = usable,
        "CHATQ_MAX_CONNECTIONS is over the open-file limit (ulimit -n); lowered"
    );
    usable
}

/// The soft `RLIMIT_NOFILE`, read from `/proc/self/limits` (Linux); `None`
/// where that file does not exist or says `unlimited`.
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Counts events and says when to log them: at most once per
/// [`WARN_EVERY`], with how many happened since the last log.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    count: u64,
}

impl Throttle {
    /// Records one event; returns the count to log, if it is time to log.
    fn tick(&mut self) -> Option<u64> {
        self.count += 1;
        if self.last.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.count))
    }
}

/// Request-level bounds, shared by every route.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    in_flight: Arc<Semaphore>,
    timeout: Duration,
    shed: Arc<Mutex<Throttle>>,
}

impl RequestLimits {
    /// The limits `config` sets.
    pub fn new(config: &ApiConfig) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight_requests as usize)),
            timeout: config.request_timeout,
            shed: Arc::default(),
        }
    }
}

/// Middleware: load shedding and a handling timeout. Past
/// `CHATQ_MAX_IN_FLIGHT_REQUESTS` a request is answered `503` at once (never
/// queued), and one not handled within `CHATQ_REQUEST_TIMEOUT_SECS` is
/// answered `503`. This is tower's `LoadShed` + `GlobalConcurrencyLimit` +
/// `Timeout`, written out because some requests are exempt (see
/// [`is_long_lived`]). Must run after routing (`Router::layer`), which sets
/// the [`MatchedPath`] it reads. Runs inside [`crate::observe`], so a shed
/// or timed-out request is counted and its warning is in its span.
pub async fn limit_request(
    State(limits): State<RequestLimits>,
    req: Request,
    next: Next,
) -> Response {
    if is_long_lived(&req) {
        return next.run(req).await;
    }
    let route = req.extensions().get::<MatchedPath>().cloned();
    let Ok(_slot) = limits.in_flight.try_acquire() else {
        let count = chatq_common::sync::lock(&limits.shed).tick();
        if let Some(count) = count {
            tracing::warn!(
                shed = count,
                "in-flight request limit reached; shedding load"
            );
        }
        return ApiError::Overloaded.into_response();
    };
    match tokio::time::timeout(limits.timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(
                route = route.as_ref().map_or("unmatched", MatchedPath::as_str),
                timeout_secs = limits.timeout.as_secs(),
                "request not handled in time"
            );
            ApiError::TimedOut(limits.timeout.as_secs()).into_response()
        }
    }
}

/// Requests exempt from the in-flight cap and the handling timeout: they
/// wait by design (long-poll up to 60 s, an SSE stream) while holding no
/// database connection, so the connection cap bounds them. `/healthz` costs
/// nothing and must answer even while the process sheds load; `/metrics`
/// too, since an overload is when operators need it (its database and
/// broker reads are cached and bounded by their own timeout).
fn is_long_lived(req: &Request) -> bool {
    let Some(route) = req.extensions().get::<MatchedPath>() else {
        return false;
    };
    match route.as_str() {
        // The facade waits for the job, bounded by CHATQ_COMPLETIONS_TIMEOUT_SECS.
        "/healthz" | "/metrics" | "/v1/jobs/{id}/events" | "/v1/chat/completions" => true,
        "/v1/jobs/{id}" => req.method() == Method::GET && asks_to_wait(req.uri().query()),
        _ => false,
    }
}

/// Whether a query string carries `wait=N` with N > 0.
fn asks_to_wait(query: Option<&str>) -> bool {
    query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .any(|(name, value)| name == "wait" && value.parse::<u32>().is_ok_and(|n| n > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_positive_wait_makes_a_long_poll() {
        assert!(asks_to_wait(Some("wait=30")));
        assert!(asks_to_wait(Some("x=1&wait=1")));
        assert!(!asks_to_wait(Some("wait=0")));
        assert!(!asks_to_wait(Some("wait=abc")));
        assert!(!asks_to_wait(Some("waiting=5")));
        assert!(!asks_to_wait(None));
    }

    #[test]
    fn the_throttle_logs_the_first_event_then_at_most_once_per_interval() {
        let mut throttle = Throttle::default();
        assert_eq!(throttle.tick(), Some(1));
        assert_eq!(throttle.tick(), None);
        assert_eq!(throttle.tick(), None);
        throttle.last = Some(Instant::now() - WARN_EVERY);
        assert_eq!(throttle.tick(), Some(3), "counts what was suppressed");
    }

    #[test]
    fn the_open_file_limit_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(open_file_limit().is_some_and(|n| n > 0));
        }
    }
}
