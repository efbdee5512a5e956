//! A lean client for `GET /v1/jobs/{id}/events`: opens the stream and
//! hands back events as they arrive, each stamped with when its bytes were
//! read. Event data is kept as text; callers parse JSON only where they
//! need it, so thousands of subscribers cost the load generator little.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context;
use uuid::Uuid;

/// How long opening a stream may take (the stream itself has no timeout).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for event streams: no total request timeout, one connection
/// per open stream. Drop it to close the connections it pooled.
pub fn client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .build()
        .context("building the event-stream client")
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct Event {
    /// The `id:` field, if any.
    pub id: Option<String>,
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` lines joined by `\n`.
    pub data: String,
    /// When the bytes that completed it were read.
    pub at: Instant,
}

impl Event {
    /// The `content` of a `delta` event (parses the data).
    pub fn delta_text(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.data).ok()?;
        v["content"].as_str().map(str::to_owned)
    }

    /// The job object of a `status` or `done` event.
    pub fn job(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.data).ok()
    }
}

/// Why opening or reading a stream failed, as a short kind for tables.
#[derive(Debug)]
pub struct StreamError(pub String);

impl StreamError {
    /// An error of the given kind.
    pub fn kind(kind: &str) -> Self {
        Self(kind.into())
    }

    fn from_reqwest(err: &reqwest::Error) -> Self {
        let kind = if err.is_timeout() {
            "timeout"
        } else if err.is_connect() {
            "connect"
        } else {
            "transport"
        };
        Self(kind.into())
    }
}

/// An open event stream; dropping it closes the connection.
pub struct Stream {
    resp: reqwest::Response,
    parser: Parser,
    ready: VecDeque<Event>,
    /// When the response head arrived.
    pub opened_at: Instant,
}

impl Stream {
    /// Opens the event stream of `job` (resuming after `last_event_id`).
    pub async fn open(
        http: &reqwest::Client,
        api_url: &str,
        key: &str,
        job: Uuid,
        last_event_id: Option<&str>,
    ) -> Result<Self, StreamError> {
        let mut req = http
            .get(format!("{api_url}/v1/jobs/{job}/events"))
            .bearer_auth(key)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = match tokio::time::timeout(OPEN_TIMEOUT, req.send()).await {
            Err(_) => return Err(StreamError::kind("timeout")),
            Ok(Err(e)) => return Err(StreamError::from_reqwest(&e)),
            Ok(Ok(resp)) => resp,
        };
        if resp.status().as_u16() != 200 {
            return Err(StreamError(resp.status().as_u16().to_string()));
        }
        Ok(Self {
            resp,
            parser: Parser::default(),
            ready: VecDeque::new(),
            opened_at: Instant::now(),
        })
    }

    /// The next event; `None` once the server closed the stream.
    pub async fn next(&mut self) -> Result<Option<Event>, StreamError> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Ok(Some(e));
            }
            match self.resp.chunk().await {
                Ok(Some(bytes)) => self
                    .parser
                    .push(&bytes, Instant::now(), &mut self.ready)
                    .map_err(|e| StreamError(format!("parse: {e}")))?,
                Ok(None) => return Ok(None),
                Err(e) => return Err(StreamError::from_reqwest(&e)),
            }
        }
    }
}

/// An incremental `text/event-stream` parser (lines end with LF or CRLF,
/// as axum writes them; `:` lines are comments; a blank line ends an event).
#[derive(Debug, Default)]
struct Parser {
    line: Vec<u8>,
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
}

impl Parser {
    /// Feeds bytes as read at `at`; complete events go to `out`.
    fn push(&mut self, bytes: &[u8], at: Instant, out: &mut VecDeque<Event>) -> anyhow::Result<()> {
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = String::from_utf8(std::mem::take(&mut self.line))
                .context("an event-stream line is not UTF-8")?;
            self.on_line(&line, at, out);
        }
        Ok(())
    }

    fn on_line(&mut self, line: &str, at: Instant, out: &mut VecDeque<Event>) {
        if line.is_empty() {
            let (id, event) = (self.id.take(), self.event.take());
            if let Some(data) = self.data.take() {
                out.push_back(Event {
                    id,
                    event: event.unwrap_or_else(|| "message".into()),
                    data,
                    at,
                });
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.id = Some(value.to_owned()),
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
}

/// Parses a job object's RFC 3339 timestamp field.
pub fn job_time(job: &serde_json::Value, field: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let s = job[field].as_str()?;
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_across_reads() {
        let input = ": keep-alive\n\nid: 1-0\nevent: status\ndata: {\"a\":1}\n\n\
                     id: 1-5\r\nevent: delta\r\ndata: {\"content\":\"héllo\"}\r\n\r\n"
            .as_bytes();
        let now = Instant::now();
        for cut in 0..input.len() {
            let mut ready = VecDeque::new();
            let mut p = Parser::default();
            p.push(&input[..cut], now, &mut ready).expect("valid");
            p.push(&input[cut..], now, &mut ready).expect("valid");
            let kinds: Vec<_> = ready.iter().map(|e| e.event.as_str()).collect();
            assert_eq!(kinds, ["status", "delta"], "cut at {cut}");
            assert_eq!(ready[1].id.as_deref(), Some("1-5"));
            assert_eq!(ready[1].delta_text().as_deref(), Some("héllo"));
        }
    }
}
