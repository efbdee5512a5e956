//! Where a queued job stands (API.md's `queue`): its place in the order
//! jobs will actually start (lanes, then fair queueing between tenants:
//! the workers' claim order) and when it is expected to start.
//!
//! Cheap per poll: no count over the queue. Each api replica keeps a
//! snapshot of the start order, read at most every [`REFRESH`] (or five
//! times as long as the last reading took, for a huge queue) and only
//! while someone asks (one statement: the first [`HEAD`] keys exactly,
//! then every [`SAMPLE`]th key with its rank), and answers from it by
//! binary search, O(log n). Positions within the head are exact as of the
//! snapshot (at most a refresh old); beyond it they are within
//! `SAMPLE / 2`. The start rate behind the ETA comes from the
//! `chatq_jobs_started` counter the claim advances, smoothed over
//! [`RATE_HORIZON`].

use std::sync::{Arc, Mutex};

use chatq_common::sync::lock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::time::Instant;

use chatq_common::db::jobs;
use chatq_common::domain::StartKey;

use crate::views::QueueView;

/// Keys read exactly from the head of the start order.
pub const HEAD: i64 = 2_000;
/// One key in this many beyond the head.
pub const SAMPLE: i64 = 50;
/// How long a snapshot is answered from (longer when reading it is slow).
const REFRESH: Duration = Duration::from_millis(200);
/// Time constant of the start-rate average.
const RATE_HORIZON: Duration = Duration::from_secs(30);
/// Start rate assumed while nothing has started recently (paused, no
/// workers): one job per ten seconds.
const MIN_RATE: f64 = 0.1;

struct Snapshot {
    at: Instant,
    wall: DateTime<Utc>,
    head: Vec<StartKey>,
    /// `(key, rank)` (1 = first) beyond the head.
    tail: Vec<(StartKey, i64)>,
    total: i64,
    started: i64,
    /// Jobs started per second.
    rate: f64,
    /// When the current run of starts began (after an idle spell), and the
    /// started counter then: for the first [`RATE_HORIZON`] the rate is
    /// the average since then, not one refresh's worth of starts.
    since: (Instant, i64),
    /// How long reading the snapshot took (refreshes are spaced by a
    /// multiple of it, so a huge queue is read less often).
    cost: Duration,
}

/// Queue positions and start estimates.
#[derive(Clone, Default)]
pub struct Positions {
    current: Arc<Mutex<Option<Arc<Snapshot>>>>,
    refresh: Arc<tokio::sync::Mutex<()>>,
}

impl Positions {
    /// The queue view of a queued job with `key`, or `None` if it cannot
    /// be computed now (the database is unreachable).
    pub async fn of(&self, db: &PgPool, key: StartKey) -> Option<QueueView> {
        let snapshot = self.snapshot(db).await?;
        let ahead = snapshot.ahead(&key);
        let position = ahead + 1;
        Some(QueueView {
            position,
            estimated_start_at: snapshot.start_estimate(ahead),
        })
    }

    /// Seconds until the queue is expected to have room for one more job
    /// (the `Retry-After` of `429 queue_full`), at least 1.
    pub async fn seconds_until_room(&self, db: &PgPool) -> u64 {
        let rate = self.snapshot(db).await.map_or(MIN_RATE, |s| s.rate);
        ((1.0 / rate).ceil() as u64).clamp(1, 60)
    }

    async fn snapshot(&self, db: &PgPool) -> Option<Arc<Snapshot>> {
        let fresh = || {
            lock(&self.current)
                .clone()
                .filter(|s| s.at.elapsed() < REFRESH.max(s.cost * 5))
        };
        if let Some(s) = fresh() {
            return Some(s);
        }
        // One reading at a time; those who waited for it use it.
        let _turn = self.refresh.lock().await;
        if let Some(s) = fresh() {
            return Some(s);
        }
        self.read(db).await
    }

    async fn read(&self, db: &PgPool) -> Option<Arc<Snapshot>> {
        let started_at = Instant::now();
        let read = jobs::start_order_sample(db, HEAD, SAMPLE).await;
        let (keys, total, started) = match read {
            Ok(read) => read,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the start order");
                return None;
            }
        };
        let previous = lock(&self.current).clone();
        let (rate, since) = match previous.as_ref() {
            None => (MIN_RATE, (Instant::now(), started)),
            Some(p) => p.next_rate(started),
        };
        let mut head = Vec::new();
        let mut tail = Vec::new();
        for (key, rank) in keys {
            if rank <= HEAD {
                head.push(key);
            } else {
                tail.push((key, rank));
            }
        }
        let snapshot = Arc::new(Snapshot {
            at: Instant::now(),
            wall: Utc::now(),
            head,
            tail,
            total,
            started,
            rate: rate.max(MIN_RATE),
            since,
            cost: started_at.elapsed(),
        });
        *lock(&self.current) = Some(Arc::clone(&snapshot));
        Some(snapshot)
    }
}

impl Snapshot {
    /// The start rate, and when the current run of starts began, given the
    /// `started` counter read now (this snapshot is the previous reading).
    fn next_rate(&self, started: i64) -> (f64, (Instant, i64)) {
        let dt = self.at.elapsed().as_secs_f64().max(0.001);
        let sample = (started - self.started).max(0) as f64 / dt;
        if self.rate <= MIN_RATE {
            // Idle until the last reading: a run of starts may begin here.
            return (sample, (self.at, self.started));
        }
        let run = self.since.0.elapsed().as_secs_f64().max(0.001);
        if run < RATE_HORIZON.as_secs_f64() {
            // Young run: everything since it began, not the last 200 ms.
            return ((started - self.since.1).max(0) as f64 / run, self.since);
        }
        // Exponential average with a time constant, whatever the spacing.
        let w = 1.0 - (-dt / RATE_HORIZON.as_secs_f64()).exp();
        (self.rate + w * (sample - self.rate), self.since)
    }

    /// Queued jobs that start before `key`.
    fn ahead(&self, key: &StartKey) -> i64 {
        let before = |k: &StartKey| k.cmp_order(key).is_lt();
        let in_head = self.head.partition_point(before);
        if in_head < self.head.len() || self.tail.is_empty() {
            return i64::try_from(in_head).unwrap_or(i64::MAX);
        }
        let i = self.tail.partition_point(|(k, _)| before(k));
        let (from, to) = match i {
            0 => (HEAD, self.tail[0].1 - 1),
            _ if i < self.tail.len() => (self.tail[i - 1].1, self.tail[i].1 - 1),
            _ => (self.tail[i - 1].1, self.total),
        };
        // Somewhere between two samples: the middle.
        from + (to - from).max(0) / 2
    }

    fn start_estimate(&self, ahead: i64) -> DateTime<Utc> {
        let secs = ahead as f64 / self.rate;
        let wait = chrono::Duration::milliseconds((secs * 1000.0).min(3.0e10) as i64);
        // From the snapshot's time, not now: between two snapshots the
        // estimate stays put instead of drifting later.
        (self.wall + wait).max(Utc::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn key(batch: bool, tag: f64) -> StartKey {
        StartKey {
            batch,
            tag,
            id: Uuid::now_v7(),
        }
    }

    fn snapshot(head: Vec<StartKey>, tail: Vec<(StartKey, i64)>, total: i64) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            wall: Utc::now(),
            head,
            tail,
            total,
            started: 0,
            rate: 2.0,
            since: (Instant::now(), 0),
            cost: Duration::ZERO,
        }
    }

    fn ago(secs: f64) -> Instant {
        Instant::now()
            .checked_sub(Duration::from_secs_f64(secs))
            .unwrap_or_else(Instant::now)
    }

    #[test]
    fn positions_in_the_head_are_exact_and_lanes_come_first() {
        let keys: Vec<StartKey> = (0..5).map(|i| key(false, f64::from(i) * 10.0)).collect();
        let s = snapshot(keys.clone(), Vec::new(), 5);
        assert_eq!(s.ahead(&keys[0]), 0);
        assert_eq!(s.ahead(&keys[3]), 3);
        // A newcomer tagged like the head starts right after it.
        assert_eq!(s.ahead(&key(false, 0.5)), 1);
        // Batch starts after every interactive job.
        assert_eq!(s.ahead(&key(true, 0.0)), 5);
    }

    #[test]
    fn beyond_the_head_the_middle_of_the_samples_is_taken() {
        let head: Vec<StartKey> = (0..HEAD).map(|i| key(false, i as f64)).collect();
        let tail = vec![
            (key(false, 3000.0), HEAD + SAMPLE),
            (key(false, 4000.0), HEAD + 2 * SAMPLE),
        ];
        let s = snapshot(head, tail, HEAD + 2 * SAMPLE + 10);
        let between = s.ahead(&key(false, 3500.0));
        assert!(
            between > HEAD + SAMPLE && between < HEAD + 2 * SAMPLE,
            "{between}"
        );
        assert!(s.ahead(&key(false, 9000.0)) <= HEAD + 2 * SAMPLE + 10);
    }

    #[test]
    fn a_young_run_of_starts_is_averaged_from_its_beginning() {
        // Idle until 200 ms ago; one start since: the run begins there.
        let mut s = snapshot(Vec::new(), Vec::new(), 0);
        (s.at, s.rate, s.started) = (ago(0.2), MIN_RATE, 0);
        let (rate, since) = s.next_rate(1);
        assert!(rate > 4.0, "{rate}");
        assert_eq!(since.1, 0);
        // 10 s into the run, 20 started: 2 per second, whatever the last
        // refresh saw (1 start in 200 ms).
        let mut s = snapshot(Vec::new(), Vec::new(), 0);
        (s.at, s.rate, s.started, s.since) = (ago(0.2), 5.0, 19, (ago(10.0), 0));
        let (rate, _) = s.next_rate(20);
        assert!((1.9..=2.1).contains(&rate), "{rate}");
        // An old run: a moving average, barely moved by one refresh that
        // saw 5 per second.
        (s.since, s.rate) = ((ago(120.0), 0), 1.0);
        let (rate, _) = s.next_rate(20);
        assert!(rate > 1.0 && rate < 1.1, "{rate}");
    }

    #[test]
    fn the_estimate_follows_the_start_rate() {
        let s = snapshot(Vec::new(), Vec::new(), 0);
        let eta = s.start_estimate(10);
        let secs = (eta - s.wall).num_milliseconds();
        assert!((4_900..=5_100).contains(&secs), "{secs}");
    }
}
