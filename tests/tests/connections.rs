//! Hostile connections: sockets that send nothing, half a request head,
//! half a body, a terabyte `Content-Length`, or idle on keep-alive are all
//! closed by the api within its timeouts; past the connection cap new
//! sockets are closed at once; past the in-flight request cap requests get
//! `503` with `Retry-After`. Meanwhile `/healthz` and submissions answer.
//!
//! These open raw TCP sockets, so they say exactly what is (not) sent.

use std::time::Duration;

use anyhow::{Context, bail};
use chatq_tests::{Api, EnvOptions, TestEnv, env_of, eventually};
use futures_util::future::join_all;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Margin on every server-side timeout before a test calls it missed: the
/// machine is shared and noisy.
const MARGIN: Duration = Duration::from_secs(30);
/// Longest wait for one answer the api should give at once.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);

/// The api's `host:port`.
fn addr(env: &TestEnv) -> String {
    env.api.url.trim_start_matches("http://").to_owned()
}

/// A client that opens a new connection per request: the api closes idle
/// connections here after a few seconds, and a pooled one could be closed
/// just as a request goes out on it.
fn fresh_client(env: &TestEnv) -> anyhow::Result<Api> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(ANSWER_DEADLINE)
        .build()?;
    Ok(Api {
        url: env.api.url.clone(),
        http,
    })
}

/// Connects and sends `bytes` (maybe nothing).
async fn open(addr: &str, bytes: &[u8]) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    if !bytes.is_empty() {
        stream.write_all(bytes).await?;
    }
    Ok(stream)
}

/// A POST /v1/chat head with `key` declaring `len` body bytes.
fn chat_head(key: &str, len: u64) -> String {
    format!(
        "POST /v1/chat HTTP/1.1\r\nHost: chatq\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
}

/// One response read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: Value,
}

impl RawResponse {
    /// A header's value (names compared case-insensitively).
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Reads one response (head and `Content-Length` body) within `deadline`.
async fn read_response(stream: &mut TcpStream, deadline: Duration) -> anyhow::Result<RawResponse> {
    tokio::time::timeout(deadline, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse::<u16>().ok())
                    .with_context(|| format!("not an HTTP response: {head:?}"))?;
                let mut response = RawResponse {
                    status,
                    head,
                    body: Value::Null,
                };
                let len: usize = response
                    .header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    response.body =
                        serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap_or(Value::Null);
                    return Ok(response);
                }
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!(
                    "closed before a whole response: {:?}",
                    String::from_utf8_lossy(&buf)
                );
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .with_context(|| format!("no response within {deadline:?}"))?
}

/// Whether the server closes `stream` within `deadline` (anything it sends
/// first is read and dropped): end-of-stream or a reset.
async fn closed_within(stream: &mut TcpStream, deadline: Duration) -> bool {
    let mut sink = [0u8; 1024];
    tokio::time::timeout(deadline, async {
        while let Ok(n) = stream.read(&mut sink).await
            && n > 0
        {}
    })
    .await
    .is_ok()
}

/// Whether `stream` is still open and silent: nothing to read for a moment.
async fn still_open(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_millis(200), stream.peek(&mut byte))
        .await
        .is_err()
}

/// The kinds of hostile connection, and the bytes each sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hostile {
    /// Connects, sends nothing.
    Silent,
    /// Sends half a request head.
    PartialHead,
    /// Declares a 100-byte body, sends 13 bytes of it.
    PartialBody,
    /// Declares a terabyte body, sends none of it.
    HugeBody,
    /// Sends one whole request, reads the answer, then idles.
    IdleKeepAlive,
}

impl Hostile {
    const ALL: [Self; 5] = [
        Self::Silent,
        Self::PartialHead,
        Self::PartialBody,
        Self::HugeBody,
        Self::IdleKeepAlive,
    ];

    fn bytes(self, key: &str) -> Vec<u8> {
        match self {
            Self::Silent => Vec::new(),
            Self::PartialHead => b"POST /v1/chat HTTP/1.1\r\nHost: chatq\r\nContent-Ty".to_vec(),
            Self::PartialBody => format!("{}{{\"content\": \"", chat_head(key, 100)).into_bytes(),
            Self::HugeBody => chat_head(key, 1_000_000_000_000).into_bytes(),
            Self::IdleKeepAlive => b"GET /healthz HTTP/1.1\r\nHost: chatq\r\n\r\n".to_vec(),
        }
    }

    /// Whether the api should hold this connection until a timeout.
    fn is_held(self) -> bool {
        matches!(self, Self::Silent | Self::PartialHead | Self::PartialBody)
    }
}

#[tokio::test]
async fn idle_and_half_sent_connections_are_closed_while_healthz_and_submissions_answer()
-> anyhow::Result<()> {
    // Arrange: short timeouts, and a cap above what this test opens.
    const PER_KIND: usize = 600;
    let timeout = Duration::from_secs(10);
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        api_env: env_of(&[
            ("CHATQ_HEADER_READ_TIMEOUT_SECS", "10"),
            ("CHATQ_BODY_READ_TIMEOUT_SECS", "10"),
            ("CHATQ_MAX_CONNECTIONS", "4000"),
        ]),
        ..Default::default()
    })
    .await?;
    let addr = addr(&env);

    // Act: 3,000 hostile sockets, the kinds interleaved, a few dozen connects
    // at a time (the api listens with tokio's backlog of 128).
    let opened_at = Instant::now();
    let plan = (0..PER_KIND).flat_map(|_| Hostile::ALL);
    let mut sockets: Vec<(Hostile, TcpStream)> = futures_util::stream::iter(plan)
        .map(|kind| {
            let (addr, bytes) = (addr.as_str(), kind.bytes(&key));
            async move { Ok::<_, anyhow::Error>((kind, open(addr, &bytes).await?)) }
        })
        .buffer_unordered(32)
        .try_collect()
        .await?;
    let idle_answers = join_all(
        sockets
            .iter_mut()
            .filter(|(kind, _)| *kind == Hostile::IdleKeepAlive)
            .map(|(_, s)| read_response(s, ANSWER_DEADLINE)),
    )
    .await;
    for answer in idle_answers {
        assert_eq!(answer?.status, 200, "the keep-alive request is answered");
    }

    // Assert: the api answers while they are open...
    let api = fresh_client(&env)?;
    let health = api
        .raw(reqwest::Method::GET, "/healthz", None, None, &[])
        .await?;
    assert_eq!(health.status, 200, "/healthz: {}", health.body);
    let submitted = api
        .post("/v1/chat", &key, &json!({"content": "hello"}))
        .await?;
    assert_eq!(submitted.status, 202, "submission: {}", submitted.body);
    let open_now = join_all(
        sockets
            .iter_mut()
            .filter(|(kind, _)| kind.is_held())
            .map(|(_, s)| still_open(s)),
    )
    .await
    .into_iter()
    .filter(|open| *open)
    .count();
    assert!(
        open_now >= PER_KIND * 3 / 2,
        "only {open_now} of {} held sockets were still open when the api answered \
         ({:?} after they were opened): the test did not load it",
        PER_KIND * 3,
        opened_at.elapsed()
    );

    // ...and then closes every one of them within its timeout.
    let deadline = timeout + MARGIN;
    let closed = join_all(
        sockets
            .iter_mut()
            .map(|(kind, s)| async { (*kind, closed_within(s, deadline).await) }),
    )
    .await;
    let left_open: Vec<Hostile> = closed
        .iter()
        .filter(|(_, closed)| !closed)
        .map(|(kind, _)| *kind)
        .collect();
    assert!(
        left_open.is_empty(),
        "{} sockets still open {:?} after opening (timeouts {timeout:?}), by kind: {:?}",
        left_open.len(),
        opened_at.elapsed(),
        Hostile::ALL.map(|k| (k, left_open.iter().filter(|o| **o == k).count()))
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once_and_the_api_answers_once_they_go()
-> anyhow::Result<()> {
    // Arrange: a small cap, and a header timeout far longer than the test
    // waits, so any socket closed here was closed by the cap.
    const CAP: usize = 300;
    const EXTRA: usize = 100;
    let (env, _key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        api_env: env_of(&[
            ("CHATQ_HEADER_READ_TIMEOUT_SECS", "600"),
            ("CHATQ_MAX_CONNECTIONS", &CAP.to_string()),
        ]),
        ..Default::default()
    })
    .await?;
    let addr = addr(&env);

    // Act: fill the cap with silent sockets, then open more.
    let mut sockets = Vec::with_capacity(CAP + EXTRA);
    for _ in 0..CAP + EXTRA {
        sockets.push(open(&addr, b"").await?);
    }
    let closed = join_all(
        sockets
            .iter_mut()
            .map(|s| closed_within(s, Duration::from_secs(10))),
    )
    .await
    .into_iter()
    .filter(|closed| *closed)
    .count();

    // Assert: the extra sockets were closed at once, the others kept (the
    // harness's own idle keep-alive connections may hold a few slots).
    assert!(
        (EXTRA..=EXTRA + 20).contains(&closed),
        "{closed} of {} sockets closed past a cap of {CAP} (expected {EXTRA} and a few)",
        CAP + EXTRA
    );
    let api = fresh_client(&env)?;
    match api
        .raw(reqwest::Method::GET, "/healthz", None, None, &[])
        .await
    {
        Ok(r) => bail!("at the cap, /healthz was served: {} {}", r.status, r.body),
        Err(err) => {
            let timed_out = err
                .downcast_ref::<reqwest::Error>()
                .is_some_and(reqwest::Error::is_timeout);
            assert!(!timed_out, "refused at once, not left hanging: {err:#}");
        }
    }
    drop(sockets);
    eventually(
        "/healthz answers once the sockets close",
        MARGIN,
        || async {
            let r = api
                .raw(reqwest::Method::GET, "/healthz", None, None, &[])
                .await;
            Ok(r.ok().filter(|r| r.status == 200))
        },
    )
    .await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn oversized_and_slow_bodies_are_answered_and_their_connection_closed() -> anyhow::Result<()>
{
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        api_env: env_of(&[("CHATQ_BODY_READ_TIMEOUT_SECS", "2")]),
        ..Default::default()
    })
    .await?;
    let addr = addr(&env);

    // A terabyte declared, nothing sent: 413 before any body is read.
    let mut huge = open(&addr, chat_head(&key, 1_000_000_000_000).as_bytes()).await?;
    let r = read_response(&mut huge, ANSWER_DEADLINE).await?;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{r:?}"
    );
    assert_eq!(r.header("connection").as_deref(), Some("close"), "{r:?}");
    assert!(
        closed_within(&mut huge, MARGIN).await,
        "the 413 closes the connection"
    );

    // Part of a body, then silence: 400 after the body read timeout.
    let mut slow = open(
        &addr,
        format!("{}{{\"content\"", chat_head(&key, 100)).as_bytes(),
    )
    .await?;
    let r = read_response(&mut slow, Duration::from_secs(2) + MARGIN).await?;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{r:?}"
    );
    assert_eq!(
        r.body["error"]["message"],
        "request body not received within 2 s"
    );
    assert_eq!(r.header("connection").as_deref(), Some("close"), "{r:?}");
    assert!(
        closed_within(&mut slow, MARGIN).await,
        "the 400 closes the connection"
    );

    // An oversized body sent whole, declared or chunked: the client can still
    // read its 413 (not a reset).
    let oversized = vec![b'a'; 300 * 1024];
    let mut declared = open(&addr, chat_head(&key, oversized.len() as u64).as_bytes()).await?;
    let _ = declared.write_all(&oversized).await;
    let r = read_response(&mut declared, ANSWER_DEADLINE).await?;
    assert_eq!(r.status, 413, "{r:?}");
    let mut chunked = open(
        &addr,
        format!(
            "POST /v1/chat HTTP/1.1\r\nHost: chatq\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    for piece in oversized.chunks(16 * 1024) {
        chunked
            .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .await?;
        chunked.write_all(piece).await?;
        chunked.write_all(b"\r\n").await?;
    }
    chunked.write_all(b"0\r\n\r\n").await?;
    let r = read_response(&mut chunked, ANSWER_DEADLINE).await?;
    assert_eq!(r.status, 413, "{r:?}");

    // A body within the limit but larger than a connection's read buffer
    // is still read whole.
    let api = fresh_client(&env)?;
    let long = "a".repeat(100_000);
    let r = api
        .post("/v1/chat", &key, &json!({"content": long}))
        .await?;
    assert_eq!(r.status, 202, "{}", r.body);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn past_the_in_flight_cap_requests_get_503_with_retry_after_and_long_polls_do_not()
-> anyhow::Result<()> {
    // Arrange: one request slot, held by a request whose body never comes.
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        api_env: env_of(&[
            ("CHATQ_MAX_IN_FLIGHT_REQUESTS", "1"),
            ("CHATQ_REQUEST_TIMEOUT_SECS", "15"),
            ("CHATQ_BODY_READ_TIMEOUT_SECS", "600"),
        ]),
        ..Default::default()
    })
    .await?;
    let api = fresh_client(&env)?;
    let mut held = open(
        &addr(&env),
        format!("{}{{\"content\"", chat_head(&key, 100)).as_bytes(),
    )
    .await?;

    // The held request must take the slot first (on a loaded machine the
    // server may parse the next connection before it).
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Act + Assert: the next request is shed at once...
    let shed = eventually("a request shed with 503", MARGIN, || async {
        let r = api.get("/v1/conversations", &key).await?;
        Ok((r.status == 503).then_some(r))
    })
    .await?;
    assert_eq!(shed.error_code(), "unavailable", "{}", shed.body);
    assert_eq!(
        shed.header("retry-after").as_deref(),
        Some("1"),
        "{}",
        shed.body
    );
    // ...but not /healthz, nor a long-poll.
    let health = api
        .raw(reqwest::Method::GET, "/healthz", None, None, &[])
        .await?;
    assert_eq!(health.status, 200, "{}", health.body);
    let poll = api
        .get(&format!("/v1/jobs/{}?wait=1", uuid::Uuid::new_v4()), &key)
        .await?;
    assert_eq!(poll.status, 404, "a long-poll is not shed: {}", poll.body);

    // The held request is answered 503 at the handling timeout...
    let r = read_response(&mut held, Duration::from_secs(15) + MARGIN).await?;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{r:?}"
    );
    // ...which frees its slot.
    eventually("a request served after the slot frees", MARGIN, || async {
        let r = api.get("/v1/conversations", &key).await?;
        Ok((r.status == 200).then_some(()))
    })
    .await?;
    env.cleanup().await;
    Ok(())
}
