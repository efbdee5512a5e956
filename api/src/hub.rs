//! The process-wide fan-out of job events to long-polls and event streams.
//!
//! Two sources feed it: PostgreSQL `NOTIFY` (every job state change, heard
//! on one `LISTEN` connection per process, see `notify`) and the events
//! exchange (streamed text, heard on one broker queue per process, see
//! `events`). However many clients wait, the process holds one database
//! connection and one broker consumer for them; a waiter holds neither.
//!
//! An event is a hint, the row is the truth: a waiter that hears
//! [`JobEvent::Changed`] re-reads the job, and one that fell behind (its
//! channel overflowed) hears [`JobEvent::Lagged`] and re-reads it too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chatq_common::sync::lock;

use tokio::sync::{broadcast, mpsc, oneshot};
use uuid::Uuid;

use chatq_common::domain::DeltaEvent;

/// Longest wait for a job's text to be routed here before a subscriber
/// goes on without it (it then joins from the row).
const BIND_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Events buffered per job for a slow subscriber before it lags.
const CHANNEL_CAPACITY: usize = 256;

/// What a subscriber of a job hears.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// The job's row changed, or may have (a listener reconnected): re-read it.
    Changed,
    /// A piece of streamed text.
    Delta(Arc<DeltaEvent>),
    /// This subscriber missed events: re-read the row.
    Lagged,
}

/// Asks the events consumer to route (or stop routing) a job's text here.
#[derive(Debug)]
pub enum BindCommand {
    /// Route the job's text to this process; answer once routed.
    Bind(Uuid, Option<oneshot::Sender<bool>>),
    /// Stop routing it.
    Unbind(Uuid),
}

struct Entry {
    tx: broadcast::Sender<JobEvent>,
    /// Subscribers that want text (event streams, not long-polls).
    text_subscribers: usize,
}

type Jobs = Arc<Mutex<HashMap<Uuid, Entry>>>;

/// The registry of subscribers, by job.
#[derive(Clone)]
pub struct JobHub {
    jobs: Jobs,
    binds: mpsc::UnboundedSender<BindCommand>,
}

/// A subscription; dropping it unsubscribes.
pub struct JobSubscription {
    id: Uuid,
    wants_text: bool,
    /// Taken (dropped) under the registry lock when unsubscribing, so the
    /// receiver count the last one sees is exact.
    rx: Option<broadcast::Receiver<JobEvent>>,
    hub: JobHub,
}

impl JobHub {
    /// A hub whose bind requests go to `binds` (the events consumer).
    pub fn new(binds: mpsc::UnboundedSender<BindCommand>) -> Self {
        Self {
            jobs: Arc::default(),
            binds,
        }
    }

    /// Subscribes to the job's state changes only (long-polls). Subscribe
    /// before reading the job, so a change in between is not missed.
    pub fn subscribe(&self, id: Uuid) -> JobSubscription {
        self.subscribe_inner(id, false).0
    }

    /// Subscribes to the job's changes and its streamed text; resolves once
    /// the text is routed to this process (or routing failed, in which case
    /// text is recovered from the row).
    pub async fn subscribe_with_text(&self, id: Uuid) -> JobSubscription {
        let (sub, first) = self.subscribe_inner(id, true);
        if first {
            let (tx, rx) = oneshot::channel();
            if self.binds.send(BindCommand::Bind(id, Some(tx))).is_ok() {
                // Text missed meanwhile is recovered from the row.
                let _ = tokio::time::timeout(BIND_WAIT, rx).await;
            }
        }
        sub
    }

    fn subscribe_inner(&self, id: Uuid, wants_text: bool) -> (JobSubscription, bool) {
        let mut jobs = lock(&self.jobs);
        let entry = jobs.entry(id).or_insert_with(|| Entry {
            tx: broadcast::channel(CHANNEL_CAPACITY).0,
            text_subscribers: 0,
        });
        let first = wants_text && entry.text_subscribers == 0;
        if wants_text {
            entry.text_subscribers += 1;
        }
        let sub = JobSubscription {
            id,
            wants_text,
            rx: Some(entry.tx.subscribe()),
            hub: self.clone(),
        };
        (sub, first)
    }

    /// The job's row changed.
    pub fn changed(&self, id: Uuid) {
        if let Some(entry) = lock(&self.jobs).get(&id) {
            let _ = entry.tx.send(JobEvent::Changed);
        }
    }

    /// Every job may have changed (a listener was away for a while).
    pub fn changed_all(&self) {
        for entry in lock(&self.jobs).values() {
            let _ = entry.tx.send(JobEvent::Changed);
        }
    }

    /// Streamed text arrived.
    pub fn delta(&self, event: DeltaEvent) {
        if let Some(entry) = lock(&self.jobs).get(&event.job_id) {
            let _ = entry.tx.send(JobEvent::Delta(Arc::new(event)));
        }
    }

    /// The jobs whose text this process wants (rebound after a reconnect).
    pub fn text_jobs(&self) -> Vec<Uuid> {
        lock(&self.jobs)
            .iter()
            .filter(|(_, e)| e.text_subscribers > 0)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Subscribers right now (all jobs), for operators.
    pub fn subscribers(&self) -> usize {
        lock(&self.jobs)
            .values()
            .map(|e| e.tx.receiver_count())
            .sum()
    }
}

impl JobSubscription {
    /// The next event; a subscriber that fell behind hears
    /// [`JobEvent::Lagged`].
    pub async fn next(&mut self) -> JobEvent {
        let Some(rx) = self.rx.as_mut() else {
            return std::future::pending().await;
        };
        match rx.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(_)) => JobEvent::Lagged,
            // The hub keeps the sender while a subscription lives.
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }

    /// Waits until the job may have changed (streamed text is ignored).
    pub async fn changed(&mut self) {
        loop {
            if !matches!(self.next().await, JobEvent::Delta(_)) {
                return;
            }
        }
    }
}

impl Drop for JobSubscription {
    fn drop(&mut self) {
        let mut jobs = lock(&self.hub.jobs);
        let Some(entry) = jobs.get_mut(&self.id) else {
            return;
        };
        if self.wants_text {
            entry.text_subscribers = entry.text_subscribers.saturating_sub(1);
            if entry.text_subscribers == 0 {
                let _ = self.hub.binds.send(BindCommand::Unbind(self.id));
            }
        }
        drop(self.rx.take());
        if entry.tx.receiver_count() == 0 {
            jobs.remove(&self.id);
        }
    }
}
