//! Retry delays: exponential backoff with full jitter, honouring the
//! provider's `Retry-After` when it asks for longer.

use std::time::Duration;

/// Delay before the first retry (the base of the exponential).
pub const RETRY_BASE: Duration = Duration::from_millis(200);
/// Longest computed backoff.
pub const RETRY_CAP: Duration = Duration::from_secs(10);

/// The delay before retry number `retry` (1 for the first retry).
pub fn delay(retry: u32, retry_after: Option<Duration>) -> Duration {
    let exp = RETRY_BASE
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(RETRY_CAP);
    // Full jitter: uniform in [0, exp], so competing workers spread out.
    let jittered = exp.mul_f64(fastrand::f64());
    retry_after.map_or(jittered, |ra| ra.max(jittered))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_the_exponential_bound() {
        for retry in 1..=20 {
            let bound = RETRY_BASE
                .saturating_mul(1u32 << (retry - 1).min(16))
                .min(RETRY_CAP);
            for _ in 0..50 {
                assert!(delay(retry, None) <= bound);
            }
        }
    }

    #[test]
    fn honours_a_longer_retry_after() {
        assert!(delay(1, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
    }
}
