//! Choosing the outcome of a chat completion call: directives and random faults.

use axum::http::StatusCode;

use crate::config::MockConfig;

/// What the mock does with one chat completion call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Answer with an OpenAI error body and this status code.
    Status(StatusCode),
    /// Never answer.
    Hang,
    /// Answer 200 with a 50 MiB body.
    Oversize,
    /// Answer 200 with truncated JSON.
    Malformed,
    /// Answer 307 to an unreachable address.
    Redirect,
    /// Answer 200 with U+0000 in the content and `usage` numbers outside
    /// `i32` (one huge, one negative): what a hostile upstream may send.
    HostileReply,
    /// Answer 500 with U+0000 in the JSON error message.
    NulError,
    /// Answer 502 with a non-JSON body holding raw 0x00 bytes.
    RawNulError,
    /// Answer 400 with a 7 MB JSON error message.
    HugeError,
    /// Answer normally.
    Success,
}

/// `[mock:...]` directives found in the last user message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Directives {
    /// Explicit outcome (`status=`, `hang`, `oversize`, `malformed`,
    /// `redirect`, `hostile_reply`, `nul_error`, `raw_nul_error`,
    /// `huge_error`); first one wins.
    pub(crate) outcome: Option<Outcome>,
    /// Latency override for this call.
    pub(crate) latency_ms: Option<u64>,
    /// Fail with 500 while this prompt has been seen at most N times.
    pub(crate) fail_first: Option<u64>,
    /// Reply with this many generated words (at most [`MAX_WORDS`]) instead
    /// of the default reply.
    pub(crate) words: Option<usize>,
    /// Delay before each streamed content chunk for this call, in
    /// milliseconds (overrides the configured `chunk_delay_ms`).
    pub(crate) chunk_delay_ms: Option<u64>,
    /// On the first call with this prompt, stream N content chunks then an
    /// error event.
    pub(crate) cut_after: Option<usize>,
    /// On the first call with this prompt, stream N content chunks then
    /// abort the connection.
    pub(crate) drop_after: Option<usize>,
    /// Stream normally but leave out the final `data: [DONE]`.
    pub(crate) no_done: bool,
    /// Answer one plain JSON completion even when asked to stream.
    pub(crate) plain: bool,
}

/// Largest `[mock:words=N]` accepted (larger values are ignored).
pub(crate) const MAX_WORDS: usize = 5_000;

/// How a streamed reply ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamEnding {
    /// Finish chunk, optional usage chunk, then `data: [DONE]` if `done`.
    Complete {
        /// Whether `data: [DONE]` closes the stream.
        done: bool,
    },
    /// After this many content chunks, an error event, then the end of
    /// the stream (what OpenAI sends when it fails mid-stream).
    ErrorAfter(usize),
    /// After this many content chunks, the body fails so the connection
    /// is reset without a proper end.
    DropAfter(usize),
}

/// Parses all `[mock:...]` directives in `text`; unknown or invalid ones are ignored.
pub(crate) fn parse_directives(text: &str) -> Directives {
    let mut out = Directives::default();
    let mut rest = text;
    while let Some(start) = rest.find("[mock:") {
        let after = &rest[start + "[mock:".len()..];
        let Some(end) = after.find(']') else { break };
        let body = after[..end].trim();
        rest = &after[end + 1..];
        let (key, value) = match body.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (body, None),
        };
        let outcome = match (key, value) {
            ("status", Some(v)) => v
                .parse::<u16>()
                .ok()
                .filter(|code| (400..=599).contains(code))
                .and_then(|code| StatusCode::from_u16(code).ok())
                .map(Outcome::Status),
            ("hang", None) => Some(Outcome::Hang),
            ("oversize", None) => Some(Outcome::Oversize),
            ("malformed", None) => Some(Outcome::Malformed),
            ("redirect", None) => Some(Outcome::Redirect),
            ("hostile_reply", None) => Some(Outcome::HostileReply),
            ("nul_error", None) => Some(Outcome::NulError),
            ("raw_nul_error", None) => Some(Outcome::RawNulError),
            ("huge_error", None) => Some(Outcome::HugeError),
            ("latency_ms", Some(v)) => {
                if let Ok(ms) = v.parse() {
                    out.latency_ms.get_or_insert(ms);
                }
                None
            }
            ("fail_first", Some(v)) => {
                if let Ok(n) = v.parse() {
                    out.fail_first.get_or_insert(n);
                }
                None
            }
            ("words", Some(v)) => {
                if let Some(n) = v.parse().ok().filter(|n| *n <= MAX_WORDS) {
                    out.words.get_or_insert(n);
                }
                None
            }
            ("chunk_delay_ms", Some(v)) => {
                if let Ok(ms) = v.parse() {
                    out.chunk_delay_ms.get_or_insert(ms);
                }
                None
            }
            ("cut_after", Some(v)) => {
                if let Ok(n) = v.parse() {
                    out.cut_after.get_or_insert(n);
                }
                None
            }
            ("drop_after", Some(v)) => {
                if let Ok(n) = v.parse() {
                    out.drop_after.get_or_insert(n);
                }
                None
            }
            ("no_done", None) => {
                out.no_done = true;
                None
            }
            ("plain", None) => {
                out.plain = true;
                None
            }
            _ => None,
        };
        if out.outcome.is_none() {
            out.outcome = outcome;
        }
    }
    out
}

/// Chooses the outcome of a call.
///
/// `prompt_count` is how many calls (including this one) have carried the
/// same last user message. Explicit directives win over the configured rates.
pub(crate) fn choose(directives: &Directives, prompt_count: u64, config: &MockConfig) -> Outcome {
    if let Some(outcome) = directives.outcome {
        return outcome;
    }
    if let Some(n) = directives.fail_first {
        return if prompt_count <= n {
            Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR)
        } else {
            Outcome::Success
        };
    }
    pick_random(fastrand::f64(), config)
}

/// Chooses how a streamed reply ends.
///
/// `cut_after` and `drop_after` only break the first call carrying the
/// prompt (`prompt_count` 1), so a retry of the same prompt succeeds; the
/// first of them in this order wins. `no_done` applies to every call.
pub(crate) fn stream_ending(directives: &Directives, prompt_count: u64) -> StreamEnding {
    let first_call = prompt_count <= 1;
    match (directives.cut_after, directives.drop_after) {
        (Some(n), _) if first_call => StreamEnding::ErrorAfter(n),
        (_, Some(n)) if first_call => StreamEnding::DropAfter(n),
        _ => StreamEnding::Complete {
            done: !directives.no_done,
        },
    }
}

/// Maps one uniform draw in `[0, 1)` to an outcome using the stacked rates.
fn pick_random(draw: f64, config: &MockConfig) -> Outcome {
    let table = [
        (
            config.rate_429,
            Outcome::Status(StatusCode::TOO_MANY_REQUESTS),
        ),
        (
            config.rate_500,
            Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR),
        ),
        (config.rate_400, Outcome::Status(StatusCode::BAD_REQUEST)),
        (config.rate_hang, Outcome::Hang),
        (config.rate_oversize, Outcome::Oversize),
        (config.rate_malformed, Outcome::Malformed),
        (config.rate_redirect, Outcome::Redirect),
    ];
    let mut threshold = 0.0;
    for (rate, outcome) in table {
        threshold += rate;
        if draw < threshold {
            return outcome;
        }
    }
    Outcome::Success
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_directives() {
        let d = parse_directives("hi [mock:status=429] [mock:latency_ms=5] [mock:hang]");
        assert_eq!(
            d.outcome,
            Some(Outcome::Status(StatusCode::TOO_MANY_REQUESTS))
        );
        assert_eq!(d.latency_ms, Some(5));
        assert_eq!(parse_directives("[mock:fail_first=3]").fail_first, Some(3));
        assert_eq!(
            parse_directives("[mock:bogus] [mock:status=abc]"),
            Directives::default()
        );
    }

    #[test]
    fn parses_streaming_directives() {
        let d = parse_directives(
            "go [mock:words=40][mock:chunk_delay_ms=20] [mock:cut_after=5] \
             [mock:drop_after=3] [mock:no_done] [mock:plain]",
        );
        assert_eq!(
            d,
            Directives {
                words: Some(40),
                chunk_delay_ms: Some(20),
                cut_after: Some(5),
                drop_after: Some(3),
                no_done: true,
                plain: true,
                ..Directives::default()
            }
        );
        // A streaming directive is not an outcome: the call still succeeds.
        assert_eq!(d.outcome, None);
    }

    #[test]
    fn first_streaming_directive_wins_and_invalid_ones_are_ignored() {
        let d = parse_directives(
            "[mock:words=7] [mock:words=9] [mock:chunk_delay_ms=1][mock:chunk_delay_ms=2]",
        );
        assert_eq!((d.words, d.chunk_delay_ms), (Some(7), Some(1)));
        assert_eq!(parse_directives("[mock:words=5000]").words, Some(MAX_WORDS));
        assert_eq!(parse_directives("[mock:words=0]").words, Some(0));
        let invalid = parse_directives(
            "[mock:words=5001] [mock:words=-1] [mock:words] [mock:cut_after=x] \
             [mock:drop_after=] [mock:chunk_delay_ms=1.5] [mock:no_done=1] [mock:plain=yes]",
        );
        assert_eq!(invalid, Directives::default());
    }

    #[test]
    fn cut_and_drop_break_only_the_first_call() {
        let cut = parse_directives("[mock:cut_after=5]");
        assert_eq!(stream_ending(&cut, 1), StreamEnding::ErrorAfter(5));
        assert_eq!(
            stream_ending(&cut, 2),
            StreamEnding::Complete { done: true }
        );
        let drop = parse_directives("[mock:drop_after=3] [mock:no_done]");
        assert_eq!(stream_ending(&drop, 1), StreamEnding::DropAfter(3));
        assert_eq!(
            stream_ending(&drop, 2),
            StreamEnding::Complete { done: false }
        );
        let both = parse_directives("[mock:drop_after=3] [mock:cut_after=1]");
        assert_eq!(stream_ending(&both, 1), StreamEnding::ErrorAfter(1));
        assert_eq!(
            stream_ending(&Directives::default(), 1),
            StreamEnding::Complete { done: true }
        );
    }

    #[test]
    fn random_pick_stacks_rates() {
        let cfg = MockConfig {
            rate_429: 0.1,
            rate_500: 0.1,
            ..MockConfig::default()
        };
        assert_eq!(
            pick_random(0.05, &cfg),
            Outcome::Status(StatusCode::TOO_MANY_REQUESTS)
        );
        assert_eq!(
            pick_random(0.15, &cfg),
            Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR)
        );
        assert_eq!(pick_random(0.25, &cfg), Outcome::Success);
    }
}
