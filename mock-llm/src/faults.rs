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
    /// Answer normally.
    Success,
}

/// `[mock:...]` directives found in the last user message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Directives {
    /// Explicit outcome (`status=`, `hang`, `oversize`, `malformed`, `redirect`); first one wins.
    pub(crate) outcome: Option<Outcome>,
    /// Latency override for this call.
    pub(crate) latency_ms: Option<u64>,
    /// Fail with 500 while this prompt has been seen at most N times.
    pub(crate) fail_first: Option<u64>,
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
