//! Following a job: its state changes and streamed text as a sequence of
//! [`StreamItem`]s, for the event stream route and the OpenAI facade.
//!
//! Resume, and why it has no gap and no duplicate: every event's `id` is
//! `<attempt>-<chars>`, the attempt whose text the client is following and
//! how many characters of that text it has received. Text comes from two
//! places: live pieces from the events exchange (each carrying its attempt
//! and character offset) and the copy the worker saves in the job's row a
//! few times a second (the final reply, once the job succeeded). A follower
//! only ever sends the characters past what the client has: a piece that
//! overlaps is cut, a piece that starts beyond it waits while the row is
//! re-read to fill the gap, and text of a newer attempt starts with `reset`.
//! So a client that reconnects with `Last-Event-ID` anywhere, also after the
//! job finished or to a replica that never saw the earlier events, gets
//! exactly the rest.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use chatq_common::db::jobs;
use chatq_common::domain::{DeltaEvent, Job, JobStatus};

use crate::AppState;
use crate::auth::Tenant;
use crate::hub::{JobEvent, JobSubscription};

/// What a follower tells its client, each with the client's position after it.
#[derive(Debug)]
pub enum StreamItem {
    /// The job's state changed (and the first item of every stream).
    Status(Box<Job>, Position),
    /// More text of the followed attempt.
    Delta(String, Position),
    /// A newer attempt's text starts; what the client had is void.
    Reset(i32, Position),
    /// The job is terminal; nothing follows.
    Done(Box<Job>, Position),
}

/// How soon the row is re-read when live text arrived with a gap before it.
const GAP_RECHECK: Duration = Duration::from_millis(100);
/// Items buffered for a slow client before the follower waits for it.
const CLIENT_BUFFER: usize = 64;

/// Follows the job `job` (just read, after subscribing with `sub`) from
/// `from` (a resumed stream's position, else the start) until it is
/// terminal, the receiver is dropped, or the api shuts down.
pub fn start(
    state: AppState,
    tenant: Tenant,
    sub: JobSubscription,
    job: Job,
    from: Position,
) -> mpsc::Receiver<StreamItem> {
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    let follower = Follower {
        tx,
        position: from,
        pending: BTreeMap::new(),
        last_status: None,
    };
    tokio::spawn(follow(state, tenant, sub, job, follower));
    rx
}

/// Where a client is in a job's text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// The attempt whose text it follows (0: none yet).
    attempt: i32,
    /// Characters of that attempt's text it has.
    chars: u64,
}

impl Position {
    /// Reads an event id (`Last-Event-ID`).
    pub fn parse(id: &str) -> Option<Self> {
        let (attempt, chars) = id.trim().split_once('-')?;
        Some(Self {
            attempt: attempt.parse().ok().filter(|a| *a >= 0)?,
            chars: chars.parse().ok()?,
        })
    }

    /// The event id of this position.
    pub fn id(self) -> String {
        format!("{}-{}", self.attempt, self.chars)
    }
}

/// The client went away, or the job ended: stop following.
struct Stop;

struct Follower {
    tx: mpsc::Sender<StreamItem>,
    position: Position,
    /// Live pieces of the followed attempt that start past `position`.
    pending: BTreeMap<u64, Arc<DeltaEvent>>,
    last_status: Option<(JobStatus, i32)>,
}

impl Follower {
    async fn send(&self, item: StreamItem) -> Result<(), Stop> {
        self.tx.send(item).await.map_err(|_| Stop)
    }

    /// Catches up with the row; `Err(Stop)` once the job is terminal (after `done`).
    async fn on_row(&mut self, job: &Job) -> Result<(), Stop> {
        if job.status.is_terminal() {
            if self.last_status.is_none() {
                self.send(StreamItem::Status(Box::new(job.clone()), self.position))
                    .await?;
            }
            if job.status == JobStatus::Succeeded {
                let content = job.result_content.as_deref().unwrap_or_default();
                self.advance(job.attempts, content).await?;
            }
            self.send(StreamItem::Done(Box::new(job.clone()), self.position))
                .await?;
            return Err(Stop);
        }
        let status = (job.status, job.attempts);
        if self.last_status != Some(status) {
            self.last_status = Some(status);
            self.send(StreamItem::Status(Box::new(job.clone()), self.position))
                .await?;
        }
        if job.status == JobStatus::Running
            && let (Some(attempt), Some(text)) = (job.partial_attempt, &job.partial_content)
        {
            self.advance(attempt, text).await?;
        } else if job.status != JobStatus::Running {
            // The attempt whose pieces wait here ended: its gap never fills.
            self.pending.clear();
        }
        Ok(())
    }

    /// Moves to `attempt` (with `reset` if the client had text of an older
    /// one) and sends what `text` holds past the client's position.
    async fn advance(&mut self, attempt: i32, text: &str) -> Result<(), Stop> {
        if !self.follow_attempt(attempt).await? {
            return Ok(());
        }
        let have = usize::try_from(self.position.chars).unwrap_or(usize::MAX);
        let rest: String = text.chars().skip(have).collect();
        if !rest.is_empty() {
            self.position.chars += rest.chars().count() as u64;
            self.send(StreamItem::Delta(rest, self.position)).await?;
        }
        self.drain_pending().await
    }

    /// False if `attempt` is older than the one followed (stale text).
    async fn follow_attempt(&mut self, attempt: i32) -> Result<bool, Stop> {
        if attempt < self.position.attempt {
            return Ok(false);
        }
        if attempt > self.position.attempt {
            let had_text = self.position.chars > 0;
            self.position = Position { attempt, chars: 0 };
            self.pending.clear();
            if had_text {
                self.send(StreamItem::Reset(attempt, self.position)).await?;
            }
        }
        Ok(true)
    }

    /// A live piece of text.
    async fn on_delta(&mut self, piece: Arc<DeltaEvent>) -> Result<(), Stop> {
        if !self.follow_attempt(piece.attempt).await? {
            return Ok(());
        }
        if piece.offset > self.position.chars {
            // Text before it was published before this process routed the
            // job's text here: wait for the row to fill the gap.
            self.pending.insert(piece.offset, piece);
            return Ok(());
        }
        self.apply(&piece).await?;
        self.drain_pending().await
    }

    /// Sends the part of a piece (starting at or before the client's
    /// position) past what the client has.
    async fn apply(&mut self, piece: &DeltaEvent) -> Result<(), Stop> {
        let skip = usize::try_from(self.position.chars - piece.offset).unwrap_or(usize::MAX);
        let rest: String = piece.content.chars().skip(skip).collect();
        if !rest.is_empty() {
            self.position.chars += rest.chars().count() as u64;
            self.send(StreamItem::Delta(rest, self.position)).await?;
        }
        Ok(())
    }

    async fn drain_pending(&mut self) -> Result<(), Stop> {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > self.position.chars {
                break;
            }
            let piece = entry.remove();
            self.apply(&piece).await?;
        }
        Ok(())
    }

    fn has_gap(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// Follows the job until it is terminal, the client leaves, or the api
/// shuts down.
async fn follow(
    state: AppState,
    tenant: Tenant,
    mut sub: JobSubscription,
    job: Job,
    mut follower: Follower,
) {
    let id = job.id;
    if follower.on_row(&job).await.is_err() {
        return;
    }
    let mut gap_recheck: Option<Instant> = None;
    loop {
        let reread = tokio::select! {
            event = sub.next() => match event {
                JobEvent::Changed | JobEvent::Lagged => true,
                JobEvent::Delta(piece) => {
                    if follower.on_delta(piece).await.is_err() {
                        return;
                    }
                    false
                }
            },
            () = chatq_common::time::sleep_until(gap_recheck) => true,
            () = follower.tx.closed() => return,
            () = state.shutdown.cancelled() => return,
        };
        if reread {
            let job = match jobs::get(&state.db, tenant.id, id).await {
                Ok(Some(job)) => job,
                // Deleted with its conversation: nothing more to tell.
                Ok(None) => return,
                Err(err) => {
                    tracing::debug!(error = %err, "event stream could not re-read its job");
                    gap_recheck = Some(Instant::now() + GAP_RECHECK);
                    continue;
                }
            };
            if follower.on_row(&job).await.is_err() {
                return;
            }
        }
        gap_recheck = match gap_recheck {
            _ if !follower.has_gap() => None,
            Some(at) if !reread => Some(at),
            _ => Some(Instant::now() + GAP_RECHECK),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_garbage_is_ignored() {
        let p = Position {
            attempt: 2,
            chars: 41,
        };
        assert_eq!(Position::parse(&p.id()), Some(p));
        assert_eq!(Position::parse("x-1"), None);
        assert_eq!(Position::parse("3"), None);
        assert_eq!(Position::parse("-1-5"), None);
    }
}
