//! Run-time configuration of the mock: latency, fault-injection rates and
//! provider-style rate limits.

use serde::{Deserialize, Deserializer, Serialize};

/// Configuration of the mock LLM server.
///
/// All rates are probabilities in `0.0..=1.0`; they are stacked in the order
/// 429, 500, 400, hang, oversize, malformed, redirect and drawn with one
/// uniform sample per request (the remainder is success).
///
/// The rate limits (`max_concurrency`, `requests_per_minute`,
/// `tokens_per_minute`, over a `rate_window_ms` "minute") are checked before
/// any of that, as a provider does; unset limits do not apply.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MockConfig {
    /// Delay before answering any request (success or fault), in milliseconds.
    pub latency_ms: u64,
    /// Delay between streamed content chunks, in milliseconds.
    pub chunk_delay_ms: u64,
    /// Probability of answering 429 Too Many Requests (with `Retry-After`).
    pub rate_429: f64,
    /// Probability of answering 500 Internal Server Error.
    pub rate_500: f64,
    /// Probability of answering 400 Bad Request.
    pub rate_400: f64,
    /// Probability of never answering at all.
    pub rate_hang: f64,
    /// Probability of answering with a 50 MiB body.
    pub rate_oversize: f64,
    /// Probability of answering 200 with truncated (invalid) JSON.
    pub rate_malformed: f64,
    /// Probability of answering a 307 redirect to an unreachable address.
    pub rate_redirect: f64,
    /// Value of the `Retry-After` header sent with injected 429 answers, in
    /// seconds (rate-limit 429s send the time until the limit has room).
    pub retry_after_secs: u64,
    /// Most chat completion calls in flight at once; a call beyond it gets
    /// 429 at once (`None`: no limit).
    pub max_concurrency: Option<u64>,
    /// Requests admitted per [`Self::rate_window_ms`] (`None`: no limit): a
    /// token bucket of this capacity, starting full and refilling
    /// continuously at this many per window.
    pub requests_per_minute: Option<u64>,
    /// Tokens admitted per [`Self::rate_window_ms`] (`None`: no limit), a
    /// token bucket like [`Self::requests_per_minute`]; a request is charged
    /// its prompt tokens plus its completion budget.
    pub tokens_per_minute: Option<u64>,
    /// Length of the rate limits' "minute", in milliseconds (60000 unless
    /// tests compress time).
    pub rate_window_ms: u64,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            chunk_delay_ms: 0,
            rate_429: 0.0,
            rate_500: 0.0,
            rate_400: 0.0,
            rate_hang: 0.0,
            rate_oversize: 0.0,
            rate_malformed: 0.0,
            rate_redirect: 0.0,
            retry_after_secs: 1,
            max_concurrency: None,
            requests_per_minute: None,
            tokens_per_minute: None,
            rate_window_ms: 60_000,
        }
    }
}

impl MockConfig {
    /// Checks that every rate is a finite number in `0.0..=1.0`, that set
    /// limits are at least 1 and that the rate window is at least 1 ms.
    pub fn validate(&self) -> Result<(), String> {
        let limits = [
            ("max_concurrency", self.max_concurrency),
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
        ];
        for (name, limit) in limits {
            if limit == Some(0) {
                return Err(format!(
                    "{name} must be at least 1 (leave it unset for no limit)"
                ));
            }
        }
        if self.rate_window_ms == 0 {
            return Err("rate_window_ms must be at least 1".to_owned());
        }
        let rates = [
            ("rate_429", self.rate_429),
            ("rate_500", self.rate_500),
            ("rate_400", self.rate_400),
            ("rate_hang", self.rate_hang),
            ("rate_oversize", self.rate_oversize),
            ("rate_malformed", self.rate_malformed),
            ("rate_redirect", self.rate_redirect),
        ];
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        Ok(())
    }
}

/// A partial [`MockConfig`]: fields that are present replace the current value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MockConfigPatch {
    latency_ms: Option<u64>,
    chunk_delay_ms: Option<u64>,
    rate_429: Option<f64>,
    rate_500: Option<f64>,
    rate_400: Option<f64>,
    rate_hang: Option<f64>,
    rate_oversize: Option<f64>,
    rate_malformed: Option<f64>,
    rate_redirect: Option<f64>,
    retry_after_secs: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    max_concurrency: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    requests_per_minute: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    tokens_per_minute: Option<Option<u64>>,
    rate_window_ms: Option<u64>,
}

/// Deserializes a field that is present, so that `null` (remove the limit)
/// differs from a missing field (keep the current value).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

impl MockConfigPatch {
    /// Returns `base` with the fields present in this patch replaced.
    pub(crate) fn apply(&self, base: MockConfig) -> MockConfig {
        MockConfig {
            latency_ms: self.latency_ms.unwrap_or(base.latency_ms),
            chunk_delay_ms: self.chunk_delay_ms.unwrap_or(base.chunk_delay_ms),
            rate_429: self.rate_429.unwrap_or(base.rate_429),
            rate_500: self.rate_500.unwrap_or(base.rate_500),
            rate_400: self.rate_400.unwrap_or(base.rate_400),
            rate_hang: self.rate_hang.unwrap_or(base.rate_hang),
            rate_oversize: self.rate_oversize.unwrap_or(base.rate_oversize),
            rate_malformed: self.rate_malformed.unwrap_or(base.rate_malformed),
            rate_redirect: self.rate_redirect.unwrap_or(base.rate_redirect),
            retry_after_secs: self.retry_after_secs.unwrap_or(base.retry_after_secs),
            max_concurrency: self.max_concurrency.unwrap_or(base.max_concurrency),
            requests_per_minute: self.requests_per_minute.unwrap_or(base.requests_per_minute),
            tokens_per_minute: self.tokens_per_minute.unwrap_or(base.tokens_per_minute),
            rate_window_ms: self.rate_window_ms.unwrap_or(base.rate_window_ms),
        }
    }
}
