//! Per-tenant bounds on the write path: the key's rate limit, the tenant's
//! share of the work queue, and the outbox bound while the broker is away.
//! Each check is cheap: a count is read at most once a second per tenant
//! (or per process) and adjusted locally in between.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chatq_common::sync::lock;
use std::time::{Duration, Instant};

use uuid::Uuid;

use chatq_common::db::{jobs, rate_limits};

use crate::AppState;
use crate::auth::Tenant;
use crate::error::ApiError;

/// A write refused by a bound.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The key is over its rate limit.
    #[error("rate limit exceeded")]
    RateLimited {
        /// Seconds until a retry can succeed.
        retry_after_secs: u64,
    },
    /// The work queue, or the tenant's share of it, is full.
    #[error("the work queue is full, retry later")]
    QueueFull {
        /// Seconds the client should wait.
        retry_after_secs: u64,
    },
    /// The broker is away and the outbox is full.
    #[error("the broker is unavailable and the backlog waiting for it is full")]
    OutboxFull {
        /// Seconds the client should wait.
        retry_after_secs: u64,
    },
    /// The count could not be read.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::RateLimited { retry_after_secs } => ApiError::RateLimited { retry_after_secs },
            Refusal::QueueFull { retry_after_secs } => ApiError::QueueFull { retry_after_secs },
            Refusal::OutboxFull { retry_after_secs } => ApiError::OutboxFull { retry_after_secs },
            Refusal::Db(err) => err.into(),
        }
    }
}

/// Result of a bound check.
type Checked = Result<(), Refusal>;

/// How long a count read from PostgreSQL is trusted (plus local increments).
const COUNT_TTL: Duration = Duration::from_secs(1);
/// Tenants whose queued count is remembered at most; the map is emptied
/// when full (the next check of each tenant reads again).
const MAX_TRACKED_TENANTS: usize = 10_000;
/// Seconds a client is asked to wait while the outbox is full.
const OUTBOX_RETRY_AFTER_SECS: u64 = 5;

/// Counts one write of the key against its per-minute limit (its own, or
/// `CHATQ_DEFAULT_RATE_LIMIT_PER_MINUTE`). Call after validation, and not
/// for an idempotent replay.
pub async fn check_rate(state: &AppState, tenant: &Tenant) -> Checked {
    let Some(limit) = tenant
        .rate_limit_per_minute
        .or(state.config.default_rate_limit_per_minute)
    else {
        return Ok(());
    };
    match rate_limits::hit(&state.db, tenant.key_id, limit).await? {
        None => Ok(()),
        // Whole seconds, rounded up, so a client that waits is not refused again.
        Some(wait) => Err(Refusal::RateLimited {
            retry_after_secs: (wait.max(0.0).ceil() as u64).max(1),
        }),
    }
}

/// A count read from PostgreSQL, plus what this process added since.
#[derive(Debug, Clone, Copy)]
struct CachedCount {
    read: i64,
    added: i64,
    at: Instant,
}

impl CachedCount {
    fn new(read: i64) -> Self {
        Self {
            read,
            added: 0,
            at: Instant::now(),
        }
    }

    fn fresh(&self) -> bool {
        self.at.elapsed() < COUNT_TTL
    }
}

/// The counts behind the queue-share and outbox bounds.
#[derive(Clone, Default)]
pub struct Backlogs {
    tenants: Arc<Mutex<HashMap<Uuid, CachedCount>>>,
    outbox: Arc<Mutex<Option<CachedCount>>>,
    /// Held while a count is read from PostgreSQL.
    refresh: Arc<tokio::sync::Mutex<()>>,
}

impl Backlogs {
    fn fresh_tenant_count(&self, tenant_id: Uuid) -> Option<i64> {
        lock(&self.tenants)
            .get(&tenant_id)
            .filter(|c| c.fresh())
            .map(|c| c.read + c.added)
    }

    /// Refuses the submission (`429 queue_full`) when the tenant already has
    /// its share of the work queue waiting: `CHATQ_TENANT_QUEUE_SHARE` of
    /// `CHATQ_MAX_QUEUE_LENGTH`. So one tenant can never fill the queue for
    /// the others. The count is re-read once a second; submissions in
    /// between are counted here, so one replica never lets a tenant past its
    /// share, and several replicas at most by what they accept in a second.
    pub async fn check_tenant_share(&self, state: &AppState, tenant: &Tenant) -> Checked {
        let share = tenant_share(state);
        let current = match self.fresh_tenant_count(tenant.id) {
            Some(current) => current,
            None => {
                // One refresh at a time: a burst must not send a count per request.
                let _refreshing = self.refresh.lock().await;
                match self.fresh_tenant_count(tenant.id) {
                    Some(current) => current,
                    None => {
                        let read = jobs::queued_count_of_tenant(&state.db, tenant.id).await?;
                        let mut tenants = lock(&self.tenants);
                        if tenants.len() >= MAX_TRACKED_TENANTS {
                            tenants.clear();
                        }
                        tenants.insert(tenant.id, CachedCount::new(read));
                        read
                    }
                }
            }
        };
        if current >= share {
            return Err(Refusal::QueueFull {
                retry_after_secs: state.positions.seconds_until_room(&state.db).await,
            });
        }
        if let Some(c) = lock(&self.tenants).get_mut(&tenant.id) {
            c.added += 1;
        }
        Ok(())
    }

    /// Refuses the submission (`503 unavailable`, nothing stored) while the
    /// broker is unreachable and `CHATQ_MAX_OUTBOX` jobs already wait
    /// unpublished. Costs nothing while the broker is up: the count is only
    /// read after this process's last publish failed.
    pub async fn check_outbox(&self, state: &AppState) -> Checked {
        if !state.publisher.broker_failing() {
            *lock(&self.outbox) = None;
            return Ok(());
        }
        let limit = i64::from(
            state
                .config
                .max_outbox
                .unwrap_or(state.config.amqp.max_queue_length),
        );
        let fresh = || {
            (*lock(&self.outbox))
                .filter(CachedCount::fresh)
                .map(|c| c.read + c.added)
        };
        let current = match fresh() {
            Some(current) => current,
            None => {
                let _refreshing = self.refresh.lock().await;
                match fresh() {
                    Some(current) => current,
                    None => {
                        let (read, _lag) = jobs::outbox(&state.db).await?;
                        *lock(&self.outbox) = Some(CachedCount::new(read));
                        read
                    }
                }
            }
        };
        if current >= limit {
            tracing::warn!(
                unpublished = current,
                limit,
                "outbox full while the broker is unreachable"
            );
            return Err(Refusal::OutboxFull {
                retry_after_secs: OUTBOX_RETRY_AFTER_SECS,
            });
        }
        if let Some(c) = lock(&self.outbox).as_mut() {
            c.added += 1;
        }
        Ok(())
    }
}

/// Queued jobs one tenant may have at once.
fn tenant_share(state: &AppState) -> i64 {
    let max = f64::from(state.config.amqp.max_queue_length);
    ((max * state.config.tenant_queue_share).floor() as i64).max(1)
}
