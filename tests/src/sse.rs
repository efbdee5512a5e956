//! A small server-sent-events client for `GET /v1/jobs/{id}/events`: an
//! incremental parser (events may be split across reads anywhere, even
//! inside a multi-byte character) and helpers to read until `done`, to
//! stop after N events (drop the [`Subscription`] to disconnect) and to
//! rebuild the streamed text.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{Stream, StreamExt};
use serde_json::Value;

/// Longest a subscription may take to connect (the stream itself has no
/// total timeout: reads are bounded by each helper's deadline).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One event of the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The `id:` field of this event, if it had one.
    pub id: Option<String>,
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` lines joined by `\n`, parsed as JSON.
    pub data: Value,
}

impl Event {
    /// The `content` of a `delta` event (`None` for other events).
    pub fn delta(&self) -> Option<&str> {
        (self.event == "delta")
            .then(|| self.data["content"].as_str())
            .flatten()
    }

    /// The job `status` carried by a `status` or `done` event.
    pub fn job_status(&self) -> Option<&str> {
        self.data["status"].as_str()
    }
}

/// An event as it was parsed, before its data is read as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    /// The `id:` field of this event, if it had one.
    pub id: Option<String>,
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` lines joined by `\n`.
    pub data: String,
}

/// An incremental parser of the `text/event-stream` format (the WHATWG
/// rules: lines end with LF, CRLF or CR; `:` lines are comments; a blank
/// line ends an event; an event without data is not dispatched).
#[derive(Debug, Default)]
pub struct Parser {
    /// Bytes of the current, incomplete line.
    line: Vec<u8>,
    /// The previous chunk ended with CR: a LF that starts the next one
    /// belongs to that line end.
    after_cr: bool,
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
}

impl Parser {
    /// Feeds bytes as they were read; complete events are appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<RawEvent>) -> anyhow::Result<()> {
        for &b in bytes {
            let after_cr = std::mem::replace(&mut self.after_cr, false);
            match b {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    let line = String::from_utf8(line).context("an SSE line is not UTF-8")?;
                    self.line(&line, out);
                }
                _ => self.line.push(b),
            }
        }
        Ok(())
    }

    /// Handles one complete line.
    fn line(&mut self, line: &str, out: &mut Vec<RawEvent>) {
        if line.is_empty() {
            let (id, event) = (self.id.take(), self.event.take());
            if let Some(data) = self.data.take() {
                out.push(RawEvent {
                    id,
                    event: event.unwrap_or_else(|| "message".to_owned()),
                    data,
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
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            // `retry` and unknown fields are ignored.
            _ => {}
        }
    }

    /// Whether bytes of an unfinished event are pending (a stream that
    /// ends here was cut in the middle of an event).
    pub fn has_partial_event(&self) -> bool {
        !self.line.is_empty() || self.data.is_some() || self.event.is_some()
    }
}

/// A client for event streams; one can carry many subscriptions at once.
#[derive(Clone)]
pub struct SseClient {
    http: reqwest::Client,
}

impl Default for SseClient {
    fn default() -> Self {
        Self::new()
    }
}

impl SseClient {
    /// A client without a total request timeout (streams are long).
    pub fn new() -> Self {
        crate::init_tls();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .expect("a plain HTTP client builds");
        Self { http }
    }

    /// Sends `GET /v1/jobs/{job_id}/events` to the api at `api_url`
    /// (resuming after `last_event_id` if given) and returns the response
    /// as it is, for callers that check other answers than a stream.
    pub async fn request(
        &self,
        api_url: &str,
        key: &str,
        job_id: &str,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut req = self
            .http
            .get(format!("{api_url}/v1/jobs/{job_id}/events"))
            .bearer_auth(key)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        tokio::time::timeout(CONNECT_TIMEOUT, req.send())
            .await
            .with_context(|| format!("the events of job {job_id} did not answer in time"))?
            .with_context(|| format!("subscribing to job {job_id}"))
    }

    /// Opens the event stream of `job_id` on the api at `api_url`, resuming
    /// after `last_event_id` if given. Fails unless the answer is
    /// `200 text/event-stream`.
    pub async fn subscribe(
        &self,
        api_url: &str,
        key: &str,
        job_id: &str,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<Subscription> {
        let resp = self.request(api_url, key, job_id, last_event_id).await?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp.text().await.unwrap_or_default();
            bail!("subscribing to job {job_id} answered {status}: {body}");
        }
        Subscription::from_response(resp, last_event_id)
    }
}

/// [`SseClient::subscribe`] with a client of its own.
pub async fn subscribe(
    api_url: &str,
    key: &str,
    job_id: &str,
    last_event_id: Option<&str>,
) -> anyhow::Result<Subscription> {
    SseClient::new()
        .subscribe(api_url, key, job_id, last_event_id)
        .await
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Vec<u8>>> + Send>>;

/// An open event stream. Dropping it closes the connection.
pub struct Subscription {
    body: ByteStream,
    parser: Parser,
    pending: VecDeque<Event>,
    last_event_id: Option<String>,
    closed: bool,
}

impl Subscription {
    /// Reads the events of a `200 text/event-stream` response
    /// (`last_event_id`: the id the request resumed from, if any).
    pub fn from_response(
        resp: reqwest::Response,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<Self> {
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        anyhow::ensure!(
            resp.status() == 200 && content_type.starts_with("text/event-stream"),
            "expected 200 text/event-stream, got {} {content_type:?}",
            resp.status()
        );
        Ok(Self {
            // Copied out of `Bytes` so this crate needs no `bytes` dependency.
            body: Box::pin(resp.bytes_stream().map(|chunk| chunk.map(|b| b.to_vec()))),
            parser: Parser::default(),
            pending: VecDeque::new(),
            last_event_id: last_event_id.map(str::to_owned),
            closed: false,
        })
    }

    /// The next event, or `None` once the server has closed the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(Some(event));
            }
            if self.closed {
                return Ok(None);
            }
            let mut raw = Vec::new();
            match self.body.next().await {
                Some(chunk) => {
                    let chunk = chunk.context("reading the event stream")?;
                    self.parser.push(&chunk, &mut raw)?;
                }
                None => {
                    self.closed = true;
                    anyhow::ensure!(
                        !self.parser.has_partial_event(),
                        "the event stream ended in the middle of an event"
                    );
                }
            }
            for r in raw {
                let data = serde_json::from_str(&r.data)
                    .with_context(|| format!("{} event data is not JSON: {}", r.event, r.data))?;
                if r.id.is_some() {
                    self.last_event_id.clone_from(&r.id);
                }
                self.pending.push_back(Event {
                    id: r.id,
                    event: r.event,
                    data,
                });
            }
        }
    }

    /// The next event within `deadline`.
    pub async fn next_within(&mut self, deadline: Duration) -> anyhow::Result<Option<Event>> {
        tokio::time::timeout(deadline, self.next())
            .await
            .with_context(|| format!("no event within {deadline:?}"))?
    }

    /// The id to resume from: the last `id:` received (or the one this
    /// subscription resumed from).
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// Reads `n` events within `deadline` (fewer only if the stream ends).
    /// Drop the subscription afterwards to disconnect.
    pub async fn take(&mut self, n: usize, deadline: Duration) -> anyhow::Result<Vec<Event>> {
        self.read_while(deadline, |events| events.len() < n).await
    }

    /// Reads events while `more(events so far)` holds, within `deadline`
    /// (stops early if the stream ends).
    pub async fn read_while(
        &mut self,
        deadline: Duration,
        mut more: impl FnMut(&[Event]) -> bool,
    ) -> anyhow::Result<Vec<Event>> {
        let mut events = Vec::new();
        tokio::time::timeout(deadline, async {
            while more(&events) {
                match self.next().await? {
                    Some(e) => events.push(e),
                    None => break,
                }
            }
            anyhow::Ok(())
        })
        .await
        .with_context(|| {
            format!(
                "timed out after {deadline:?} with {} events: {}",
                events.len(),
                kinds(&events).join(",")
            )
        })??;
        Ok(events)
    }

    /// Reads every event up to and including `done` within `deadline`,
    /// then checks that the server closes the stream.
    pub async fn read_until_done(&mut self, deadline: Duration) -> anyhow::Result<Vec<Event>> {
        let events = self
            .read_while(deadline, |events| {
                events.last().is_none_or(|e| e.event != "done")
            })
            .await?;
        if events.last().is_none_or(|e| e.event != "done") {
            bail!(
                "the stream ended without `done` after {} events: {}",
                events.len(),
                kinds(&events).join(",")
            );
        }
        match self.next_within(deadline).await? {
            None => Ok(events),
            Some(extra) => bail!("an event after `done`: {extra:?}"),
        }
    }
}

/// The event names, in order (for messages).
pub fn kinds(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// Applies events to `text` as a subscriber must: a `reset` starts the
/// text over, a `delta` appends to it.
pub fn apply(text: &mut String, events: &[Event]) {
    for e in events {
        match e.event.as_str() {
            "reset" => text.clear(),
            "delta" => text.push_str(e.delta().unwrap_or_default()),
            _ => {}
        }
    }
}

/// The text `events` amount to: the deltas after the last `reset`.
pub fn text_of(events: &[Event]) -> String {
    let mut text = String::new();
    apply(&mut text, events);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], cuts: &[usize]) -> Vec<RawEvent> {
        let mut parser = Parser::default();
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            parser.push(&input[start..cut], &mut out).expect("valid");
            start = cut;
        }
        out
    }

    fn raw(id: Option<&str>, event: &str, data: &str) -> RawEvent {
        RawEvent {
            id: id.map(str::to_owned),
            event: event.to_owned(),
            data: data.to_owned(),
        }
    }

    #[test]
    fn parses_fields_comments_and_multi_line_data() {
        let input = b": keep-alive\n\nid: 1\nevent: delta\ndata: {\"content\":\"a\"}\n\n\
                      id:2\ndata:x\ndata: y\nretry: 10\n\nevent: lone\n\n";
        assert_eq!(
            parse_in_pieces(input, &[]),
            vec![
                raw(Some("1"), "delta", "{\"content\":\"a\"}"),
                raw(Some("2"), "message", "x\ny"),
            ]
        );
    }

    #[test]
    fn events_split_anywhere_parse_the_same() {
        let input = "id: 7\r\nevent: delta\r\ndata: {\"content\":\"héllo 世界 🌍\"}\r\n\r\n\
                     id: 8\revent: done\rdata: {}\r\r"
            .as_bytes();
        let whole = parse_in_pieces(input, &[]);
        assert_eq!(
            whole,
            vec![
                raw(Some("7"), "delta", "{\"content\":\"héllo 世界 🌍\"}"),
                raw(Some("8"), "done", "{}"),
            ]
        );
        for a in 0..input.len() {
            assert_eq!(parse_in_pieces(input, &[a]), whole, "cut at {a}");
            for b in a..input.len() {
                assert_eq!(parse_in_pieces(input, &[a, b]), whole, "cuts at {a}, {b}");
            }
        }
        let bytewise: Vec<usize> = (1..input.len()).collect();
        assert_eq!(parse_in_pieces(input, &bytewise), whole);
    }

    #[test]
    fn a_partial_event_is_reported() {
        let mut parser = Parser::default();
        let mut out = Vec::new();
        parser
            .push(b"event: delta\ndata: {\"con", &mut out)
            .expect("valid");
        assert!(out.is_empty() && parser.has_partial_event());
        parser.push(b"tent\":\"x\"}\n\n", &mut out).expect("valid");
        assert_eq!(out.len(), 1);
        assert!(!parser.has_partial_event());
    }

    #[test]
    fn text_honours_the_last_reset() {
        let ev = |event: &str, data: Value| Event {
            id: None,
            event: event.to_owned(),
            data,
        };
        let events = [
            ev("status", serde_json::json!({"status": "running"})),
            ev("delta", serde_json::json!({"content": "ab"})),
            ev("reset", serde_json::json!({"attempt": 2})),
            ev("delta", serde_json::json!({"content": "x"})),
            ev("delta", serde_json::json!({"content": "é"})),
        ];
        assert_eq!(text_of(&events), "xé");
        assert_eq!(text_of(&events[..2]), "ab");
    }
}
