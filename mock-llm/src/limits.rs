//! Provider-style rate limits, enforced as OpenAI does: a cap on concurrent
//! calls and two token buckets, one for requests and one for tokens.
//!
//! Each per-minute limit is a bucket of capacity = limit that starts full and
//! refills continuously at limit per window (`rate_window_ms`, a minute
//! unless tests compress time): at most `limit` in a burst, then
//! `limit / window` steadily. A call is admitted only if fewer than
//! `max_concurrency` calls are in flight, the requests bucket holds at least
//! 1 and the tokens bucket holds at least the call's charge (its prompt
//! tokens plus its completion budget). Admission debits both buckets; when
//! the reply is complete (or the client goes away) the tokens bucket is
//! credited back the charge minus the tokens actually used. Rejected calls
//! are not charged and get 429 with OpenAI's body and `Retry-After` headers.
//! Every answer carries the `x-ratelimit-*` headers of the configured buckets.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use axum::{
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::Response,
};

use crate::{
    config::MockConfig,
    reply::error_response,
    stats::{InFlightGuard, Stats},
};

/// Suggested wait after a concurrency rejection (no bucket says when a slot frees).
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// A token bucket of `capacity` that refills continuously by `capacity` per `window`.
///
/// The level is kept in units of 1/`window_ns` token, so refills are exact
/// integer maths: `elapsed_ns × capacity` units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bucket {
    capacity: u64,
    window: Duration,
    level: u128,
    updated: Instant,
}

impl Bucket {
    /// A full bucket as of `now`.
    pub(crate) fn full(capacity: u64, window: Duration, now: Instant) -> Self {
        let mut bucket = Self {
            capacity,
            window,
            level: 0,
            updated: now,
        };
        bucket.level = bucket.units(capacity);
        bucket
    }

    /// `tokens` in level units.
    fn units(&self, tokens: u64) -> u128 {
        u128::from(tokens).saturating_mul(self.window.as_nanos().max(1))
    }

    /// Adds what flowed in since the last update, up to the capacity.
    pub(crate) fn refill(&mut self, now: Instant) {
        if now <= self.updated {
            return;
        }
        let inflow = (now - self.updated)
            .as_nanos()
            .saturating_mul(u128::from(self.capacity));
        self.level = self
            .level
            .saturating_add(inflow)
            .min(self.units(self.capacity));
        self.updated = now;
    }

    /// Whole tokens in the bucket (floor).
    pub(crate) fn remaining(&self) -> u64 {
        let whole = self.level / self.window.as_nanos().max(1);
        u64::try_from(whole).unwrap_or(u64::MAX)
    }

    /// Whether the bucket holds at least `tokens`.
    pub(crate) fn holds(&self, tokens: u64) -> bool {
        self.level >= self.units(tokens)
    }

    /// Removes `tokens` (the level stops at zero).
    pub(crate) fn take(&mut self, tokens: u64) {
        self.level = self.level.saturating_sub(self.units(tokens));
    }

    /// Puts back `tokens` (the level stops at the capacity).
    pub(crate) fn give(&mut self, tokens: u64) {
        self.level = self
            .level
            .saturating_add(self.units(tokens))
            .min(self.units(self.capacity));
    }

    /// Time until the bucket holds `tokens` (zero if it already does).
    pub(crate) fn time_until(&self, tokens: u64) -> Duration {
        let missing = self.units(tokens).saturating_sub(self.level);
        let nanos = missing.div_ceil(u128::from(self.capacity.max(1)));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Time until the bucket is full again.
    pub(crate) fn time_until_full(&self) -> Duration {
        self.time_until(self.capacity)
    }
}

/// The limits in force, read from the config for each call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Most calls in flight at once.
    pub(crate) max_concurrency: Option<u64>,
    /// Capacity and refill per window of the requests bucket.
    pub(crate) requests: Option<u64>,
    /// Capacity and refill per window of the tokens bucket.
    pub(crate) tokens: Option<u64>,
    /// The "minute" of both buckets.
    pub(crate) window: Duration,
}

impl Limits {
    /// The limits set in `config`.
    pub(crate) fn of(config: &MockConfig) -> Self {
        Self {
            max_concurrency: config.max_concurrency,
            requests: config.requests_per_minute,
            tokens: config.tokens_per_minute,
            window: Duration::from_millis(config.rate_window_ms),
        }
    }
}

/// Which OpenAI limit refused a call (the error body's `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Concurrency or requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
}

/// Why a call was refused and how long to wait before trying again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The limit that refused it.
    pub(crate) kind: Kind,
    /// OpenAI-style error message.
    pub(crate) message: String,
    /// Time until the limiting bucket has room.
    pub(crate) wait: Duration,
}

/// The two buckets; `None` when the limit is not set.
#[derive(Debug, Default)]
pub(crate) struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// Makes `slot` match `limit`: dropped if unset, a new full bucket if the
/// limit or window changed, else refilled up to `now`.
fn sync(slot: &mut Option<Bucket>, limit: Option<u64>, window: Duration, now: Instant) {
    match (slot.as_mut(), limit) {
        (_, None) => *slot = None,
        (Some(b), Some(cap)) if b.capacity == cap && b.window == window => b.refill(now),
        (_, Some(cap)) => *slot = Some(Bucket::full(cap, window, now)),
    }
}

impl Buckets {
    /// Admits a call charged `charge` tokens when `in_flight` calls are
    /// running, debiting both buckets, or says why not (nothing debited).
    pub(crate) fn try_admit(
        &mut self,
        limits: &Limits,
        in_flight: u64,
        charge: u64,
        now: Instant,
    ) -> Result<(), Refusal> {
        sync(&mut self.requests, limits.requests, limits.window, now);
        sync(&mut self.tokens, limits.tokens, limits.window, now);
        if let Some(max) = limits.max_concurrency
            && in_flight >= max
        {
            return Err(Refusal {
                kind: Kind::Requests,
                message: format!(
                    "Rate limit reached for requests: {in_flight} concurrent requests \
                     (limit {max}). Please try again in {}.",
                    format_duration(CONCURRENCY_RETRY)
                ),
                wait: CONCURRENCY_RETRY,
            });
        }
        if let Some(b) = &self.requests
            && !b.holds(1)
        {
            let wait = b.time_until(1);
            return Err(Refusal {
                kind: Kind::Requests,
                message: format!(
                    "Rate limit reached for requests per min (RPM): Limit {}, Used {}, \
                     Requested 1. Please try again in {}.",
                    b.capacity,
                    b.capacity.saturating_sub(b.remaining()),
                    format_duration(wait)
                ),
                wait,
            });
        }
        if let Some(b) = &self.tokens
            && !b.holds(charge)
        {
            return Err(if charge > b.capacity {
                Refusal {
                    kind: Kind::Tokens,
                    message: format!(
                        "Request too large for tokens per min (TPM): Limit {}, Requested \
                         {charge}. The input or output tokens must be reduced in order to \
                         run successfully.",
                        b.capacity
                    ),
                    wait: b.time_until_full(),
                }
            } else {
                let wait = b.time_until(charge);
                Refusal {
                    kind: Kind::Tokens,
                    message: format!(
                        "Rate limit reached for tokens per min (TPM): Limit {}, Used {}, \
                         Requested {charge}. Please try again in {}.",
                        b.capacity,
                        b.capacity.saturating_sub(b.remaining()),
                        format_duration(wait)
                    ),
                    wait,
                }
            });
        }
        if let Some(b) = &mut self.requests {
            b.take(1);
        }
        if let Some(b) = &mut self.tokens {
            b.take(charge);
        }
        Ok(())
    }

    /// Credits back `charge - used` tokens (or debits the excess if the
    /// call used more than it was charged).
    pub(crate) fn settle(&mut self, charge: u64, used: u64, now: Instant) {
        if let Some(b) = &mut self.tokens {
            b.refill(now);
            if used <= charge {
                b.give(charge - used);
            } else {
                b.take(used - charge);
            }
        }
    }

    /// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
    /// headers for the configured buckets.
    pub(crate) fn headers(&self) -> HeaderMap {
        const NAMES: [(&str, &str, &str); 2] = [
            (
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ),
            (
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ),
        ];
        let mut headers = HeaderMap::new();
        for ((limit, remaining, reset), bucket) in
            NAMES.into_iter().zip([&self.requests, &self.tokens])
        {
            let Some(b) = bucket else { continue };
            headers.insert(
                HeaderName::from_static(limit),
                HeaderValue::from(b.capacity),
            );
            headers.insert(
                HeaderName::from_static(remaining),
                HeaderValue::from(b.remaining()),
            );
            if let Ok(value) = HeaderValue::try_from(format_duration(b.time_until_full())) {
                headers.insert(HeaderName::from_static(reset), value);
            }
        }
        headers
    }
}

/// Formats a duration as OpenAI's `x-ratelimit-reset-*` headers do (Go's
/// style, rounded up to whole milliseconds): `0s`, `120ms`, `1s`, `1.5s`,
/// `6m0s`, `1h2m3.4s`.
pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let (hours, minutes) = (ms / 3_600_000, ms / 60_000 % 60);
    let (secs, frac) = (ms / 1_000 % 60, ms % 1_000);
    let mut out = String::new();
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let _ = write!(out, "{secs}");
    if frac > 0 {
        let frac = format!("{frac:03}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('s');
    out
}

/// Enforces the limits for the whole mock; shared by all calls.
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    buckets: Mutex<Buckets>,
}

/// An admitted call: keeps it in flight and settles its token charge when dropped.
#[derive(Debug)]
pub(crate) struct Admission {
    /// Counts the call as in flight (see [`Stats`]).
    pub(crate) in_flight: InFlightGuard,
    /// Settles the token charge.
    pub(crate) charge: Charge,
    /// `x-ratelimit-*` headers after this call's debit.
    pub(crate) headers: HeaderMap,
}

/// A call's token charge; on drop the tokens bucket is credited back
/// `charge - used` ([`Charge::set_used`], 0 unless set: a call that reports
/// no usage is not charged).
#[derive(Debug)]
pub(crate) struct Charge {
    limiter: Arc<Limiter>,
    charge: u64,
    used: u64,
}

impl Charge {
    /// Records the tokens the call used (`prompt_tokens + completion_tokens`).
    pub(crate) fn set_used(&mut self, used: u64) {
        self.used = used;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.limiter
            .lock()
            .settle(self.charge, self.used, Instant::now());
    }
}

/// A refused call: 429 with OpenAI's body and headers.
#[derive(Debug)]
pub(crate) struct Rejection {
    refusal: Refusal,
    headers: HeaderMap,
}

impl Limiter {
    fn lock(&self) -> MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a call charged `charge` tokens under `limits`, counting it in
    /// `stats` as in flight, or refuses it (nothing counted or charged).
    ///
    /// The in-flight check and increment happen under the lock, so calls
    /// in flight never exceed `max_concurrency`.
    pub(crate) fn admit(
        self: &Arc<Self>,
        stats: &Arc<Stats>,
        limits: &Limits,
        charge: u64,
    ) -> Result<Admission, Box<Rejection>> {
        let mut buckets = self.lock();
        match buckets.try_admit(limits, stats.in_flight(), charge, Instant::now()) {
            Ok(()) => Ok(Admission {
                in_flight: stats.enter(),
                charge: Charge {
                    limiter: Arc::clone(self),
                    charge,
                    used: 0,
                },
                headers: buckets.headers(),
            }),
            Err(refusal) => Err(Box::new(Rejection {
                refusal,
                headers: buckets.headers(),
            })),
        }
    }

    /// Forgets the buckets: the next call starts with full ones.
    pub(crate) fn reset(&self) {
        *self.lock() = Buckets::default();
    }
}

impl Rejection {
    /// 429 `rate_limit_exceeded` with `Retry-After` (whole seconds, at least
    /// 1), `retry-after-ms` and the `x-ratelimit-*` headers.
    pub(crate) fn into_response(self) -> Response {
        let kind = match self.refusal.kind {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
        };
        let mut resp = error_response(
            StatusCode::TOO_MANY_REQUESTS,
            kind,
            Some("rate_limit_exceeded"),
            self.refusal.message,
        );
        let ms = self.refusal.wait.as_nanos().div_ceil(1_000_000).max(1);
        let secs = ms.div_ceil(1_000);
        let headers = resp.headers_mut();
        headers.extend(self.headers);
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(u64::try_from(secs).unwrap_or(u64::MAX)),
        );
        headers.insert(
            HeaderName::from_static("retry-after-ms"),
            HeaderValue::from(u64::try_from(ms).unwrap_or(u64::MAX)),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bucket_starts_full_and_refills_continuously() {
        let t0 = Instant::now();
        let mut b = Bucket::full(3, SEC, t0);
        assert_eq!(b.remaining(), 3);
        assert_eq!(b.time_until_full(), Duration::ZERO);
        b.take(3);
        assert!(!b.holds(1));
        assert_eq!(b.time_until(1), Duration::from_nanos(333_333_334));
        assert_eq!(b.time_until_full(), SEC);
        b.refill(t0 + ms(500));
        assert_eq!(b.remaining(), 1, "1.5 tokens");
        assert!(b.holds(1) && !b.holds(2));
        assert_eq!(b.time_until(2), Duration::from_nanos(166_666_667));
        b.refill(t0 + ms(10_000));
        assert_eq!(b.remaining(), 3, "never above the capacity");
        // An older instant (another thread's clock read) changes nothing.
        b.refill(t0);
        assert_eq!(b.remaining(), 3);
    }

    #[test]
    fn bucket_give_and_take_saturate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(100, ms(2_000), t0);
        b.take(150);
        assert_eq!(b.remaining(), 0);
        b.give(30);
        assert_eq!(b.remaining(), 30);
        b.give(1_000);
        assert_eq!(b.remaining(), 100);
        // 100 per 2 s: 50 tokens take 1 s.
        b.take(100);
        assert_eq!(b.time_until(50), SEC);
        let day = Duration::from_secs(86_400);
        let mut big = Bucket::full(1_000_000_000_000, day, t0);
        big.take(1_000_000_000_000);
        big.refill(t0 + day / 2);
        assert_eq!(big.remaining(), 500_000_000_000);
        // Absurd settings saturate instead of overflowing.
        let mut huge = Bucket::full(u64::MAX, Duration::from_secs(u64::MAX), t0);
        huge.take(1);
        huge.refill(t0 + day);
        assert!(huge.holds(1));
        assert_eq!(huge.time_until(u64::MAX), Duration::ZERO);
    }

    fn limits(requests: Option<u64>, tokens: Option<u64>) -> Limits {
        Limits {
            max_concurrency: None,
            requests,
            tokens,
            window: SEC,
        }
    }

    #[test]
    fn admission_checks_every_limit_and_charges_only_admitted_calls() {
        let t0 = Instant::now();
        let mut b = Buckets::default();
        let l = limits(Some(2), Some(100));
        assert_eq!(b.try_admit(&l, 0, 60, t0), Ok(()));
        let refusal = b.try_admit(&l, 0, 60, t0).expect_err("tokens");
        assert_eq!(refusal.kind, Kind::Tokens);
        // 20 more tokens at 100 per second.
        assert_eq!(refusal.wait, ms(200));
        assert!(refusal.message.starts_with("Rate limit reached for tokens"));
        assert_eq!(b.try_admit(&l, 0, 40, t0), Ok(()));
        let refusal = b.try_admit(&l, 0, 1, t0).expect_err("requests");
        assert_eq!((refusal.kind, refusal.wait), (Kind::Requests, ms(500)));
        let h = b.headers();
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "0");
        assert_eq!(h["x-ratelimit-limit-tokens"], "100");
        assert_eq!(h["x-ratelimit-reset-requests"], "1s");

        // The call charged 60 used 25: 35 come back.
        b.settle(60, 25, t0);
        assert_eq!(b.headers()["x-ratelimit-remaining-tokens"], "35");
        // A call that used more than its charge pays the excess.
        b.settle(10, 20, t0);
        assert_eq!(b.headers()["x-ratelimit-remaining-tokens"], "25");

        let concurrency = Limits {
            max_concurrency: Some(2),
            ..limits(None, None)
        };
        let mut b = Buckets::default();
        assert_eq!(b.try_admit(&concurrency, 1, 1, t0), Ok(()));
        let refusal = b.try_admit(&concurrency, 2, 1, t0).expect_err("full");
        assert_eq!((refusal.kind, refusal.wait), (Kind::Requests, SEC));
        assert!(b.headers().is_empty(), "no per-minute limit configured");
    }

    #[test]
    fn a_charge_above_the_capacity_is_too_large() {
        let t0 = Instant::now();
        let mut b = Buckets::default();
        let refusal = b
            .try_admit(&limits(None, Some(10)), 0, 11, t0)
            .expect_err("too large");
        assert_eq!(refusal.kind, Kind::Tokens);
        assert!(refusal.message.starts_with("Request too large"));
        assert_eq!(b.headers()["x-ratelimit-remaining-tokens"], "10");
    }

    #[test]
    fn changed_limits_start_a_new_full_bucket() {
        let t0 = Instant::now();
        let mut b = Buckets::default();
        assert_eq!(b.try_admit(&limits(Some(1), None), 0, 5, t0), Ok(()));
        assert!(b.try_admit(&limits(Some(1), None), 0, 5, t0).is_err());
        assert_eq!(b.try_admit(&limits(Some(2), None), 0, 5, t0), Ok(()));
        assert_eq!(b.headers()["x-ratelimit-remaining-requests"], "1");
        assert_eq!(b.try_admit(&limits(None, None), 0, 5, t0), Ok(()));
        assert!(b.headers().is_empty());
    }

    #[test]
    fn durations_are_formatted_like_openai() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_micros(1), "1ms"),
            (ms(120), "120ms"),
            (ms(999), "999ms"),
            (SEC, "1s"),
            (ms(1_500), "1.5s"),
            (ms(1_050), "1.05s"),
            (Duration::from_nanos(1_000_000_001), "1.001s"),
            (Duration::from_secs(360), "6m0s"),
            (ms(372_672), "6m12.672s"),
            (Duration::from_secs(3_600), "1h0m0s"),
            (ms(3_723_400), "1h2m3.4s"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(d), want, "{d:?}");
        }
    }
}
