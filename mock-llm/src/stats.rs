//! Call counters and the ring buffer of recorded requests.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use serde_json::{Value, json};

/// Maximum number of request bodies kept by `/_mock/requests`.
pub(crate) const MAX_RECORDED_REQUESTS: usize = 2_000;

/// Shared counters of the mock.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    in_flight: AtomicU64,
    /// Highest `in_flight` since start or the last reset.
    peak_in_flight: AtomicU64,
    /// 429s sent by the rate limits (not by fault injection).
    rate_limited: AtomicU64,
    /// Streamed replies whose body was dropped before its last event.
    disconnected: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    total: u64,
    by_prompt: HashMap<String, u64>,
    requests: VecDeque<Value>,
}

/// Decrements the in-flight counter when dropped.
#[derive(Debug)]
pub(crate) struct InFlightGuard(Arc<Stats>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Held by a streamed body: keeps the call in flight and, if the body is
/// dropped before [`StreamGuard::finish`] (the client went away, e.g. a
/// worker abandoning a cancelled call), counts the stream as disconnected.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    in_flight: InFlightGuard,
    finished: bool,
}

impl StreamGuard {
    /// Wraps the call's in-flight guard.
    pub(crate) fn new(in_flight: InFlightGuard) -> Self {
        Self {
            in_flight,
            finished: false,
        }
    }

    /// Marks the stream as having produced its last event.
    pub(crate) fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.in_flight
                .0
                .disconnected
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Stats {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks a request as in flight until the guard is dropped.
    pub(crate) fn enter(self: &Arc<Self>) -> InFlightGuard {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlightGuard(Arc::clone(self))
    }

    /// Calls in flight now.
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one call refused by the rate limits.
    pub(crate) fn count_rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one call, stores its body (if it was JSON) and, if `prompt` is
    /// given, bumps its per-prompt counter. Returns that counter (0 without prompt).
    pub(crate) fn record(&self, body: Option<Value>, prompt: Option<&str>) -> u64 {
        let mut inner = self.lock();
        inner.total += 1;
        if let Some(body) = body {
            if inner.requests.len() >= MAX_RECORDED_REQUESTS {
                inner.requests.pop_front();
            }
            inner.requests.push_back(body);
        }
        let Some(prompt) = prompt else { return 0 };
        if let Some(count) = inner.by_prompt.get_mut(prompt) {
            *count += 1;
            *count
        } else {
            inner.by_prompt.insert(prompt.to_owned(), 1);
            1
        }
    }

    /// `{"total", "in_flight", "peak_in_flight", "rate_limited",
    /// "disconnected", "by_prompt"}`.
    pub(crate) fn snapshot(&self) -> Value {
        let inner = self.lock();
        json!({
            "total": inner.total,
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "peak_in_flight": self.peak_in_flight.load(Ordering::Relaxed),
            "rate_limited": self.rate_limited.load(Ordering::Relaxed),
            "disconnected": self.disconnected.load(Ordering::Relaxed),
            "by_prompt": inner.by_prompt,
        })
    }

    /// `{"data": [...]}` with the recorded request bodies, oldest first.
    pub(crate) fn requests(&self) -> Value {
        let data: Vec<Value> = self.lock().requests.iter().cloned().collect();
        json!({ "data": data })
    }

    /// Zeroes the counters and forgets recorded requests (in-flight stays
    /// live; the peak restarts from the calls in flight now).
    pub(crate) fn reset(&self) {
        let mut inner = self.lock();
        self.disconnected.store(0, Ordering::Relaxed);
        self.rate_limited.store(0, Ordering::Relaxed);
        self.peak_in_flight
            .store(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
        inner.total = 0;
        inner.by_prompt.clear();
        inner.requests.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_buffer_drops_oldest() {
        let stats = Stats::default();
        for i in 0..(MAX_RECORDED_REQUESTS + 5) {
            stats.record(Some(json!(i)), None);
        }
        let data = stats.requests();
        let data = data["data"].as_array().expect("array");
        assert_eq!(data.len(), MAX_RECORDED_REQUESTS);
        assert_eq!(data[0], json!(5));
    }

    #[test]
    fn in_flight_guard_counts() {
        let stats = Arc::new(Stats::default());
        let g = stats.enter();
        assert_eq!(stats.snapshot()["in_flight"], 1);
        drop(g);
        assert_eq!(stats.snapshot()["in_flight"], 0);
    }

    #[test]
    fn peak_in_flight_and_rate_limited_count_and_reset() {
        let stats = Arc::new(Stats::default());
        let (a, b) = (stats.enter(), stats.enter());
        drop(a);
        stats.count_rate_limited();
        let snap = stats.snapshot();
        assert_eq!(
            (snap["peak_in_flight"].clone(), snap["rate_limited"].clone()),
            (json!(2), json!(1))
        );
        stats.reset();
        let snap = stats.snapshot();
        assert_eq!(
            (snap["peak_in_flight"].clone(), snap["rate_limited"].clone()),
            (json!(1), json!(0)),
            "one call still in flight"
        );
        drop(b);
        assert_eq!(stats.in_flight(), 0);
    }

    #[test]
    fn stream_guard_counts_only_unfinished_streams() {
        let stats = Arc::new(Stats::default());
        let mut finished = StreamGuard::new(stats.enter());
        finished.finish();
        drop(finished);
        assert_eq!(stats.snapshot()["disconnected"], 0);
        let abandoned = StreamGuard::new(stats.enter());
        assert_eq!(stats.snapshot()["in_flight"], 1);
        drop(abandoned);
        assert_eq!(stats.snapshot()["disconnected"], 1);
        assert_eq!(stats.snapshot()["in_flight"], 0);
        stats.reset();
        assert_eq!(stats.snapshot()["disconnected"], 0);
    }
}
