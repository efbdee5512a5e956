//! The LLM budget shared by every worker process (`CHATQ_LLM_*`): before a
//! call starts it takes capacity from PostgreSQL (a slot under the
//! concurrency cap, one request and its estimated tokens from the
//! per-window buckets; `chatq_common::db::llm_budget`), and gives it back
//! when the call ends, refunding the tokens the provider did not count.
//!
//! Waiting costs little: in each process one waiter per model asks the
//! database (the others queue behind it in memory), and it sleeps without a
//! connection until the time the database named or until a release is
//! announced (`NOTIFY`), whichever comes first.
//!
//! When the provider says stop (a 429, or `x-ratelimit-remaining-*` at 0),
//! the pause is written to PostgreSQL and announced: every worker stops
//! calling that model until it ends, then each waiter resumes at a random
//! point of a spread window, and the buckets refill from empty, so capacity
//! comes back gradually instead of all at the reset instant.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chatq_common::sync::lock;
use std::time::Duration;

use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use chatq_common::db::llm_budget::{self, Limits, PAUSE_CHANNEL};

/// Wait before asking again when the database could not be read.
const DB_RETRY: Duration = Duration::from_secs(1);
/// Bounds of the window over which calls resume after a provider pause.
const MIN_SPREAD: Duration = Duration::from_secs(1);
const MAX_SPREAD: Duration = Duration::from_secs(10);
/// Share of the configured requests and tokens per window that is used:
/// the provider's buckets run on its clock, and requests reach it with
/// jitter, so a budget of exactly its limit would now and then arrive a
/// moment early; 5% headroom absorbs that.
pub const USABLE_SHARE: f64 = 0.95;
/// Pause assumed when the provider answers 429 without saying for how long.
pub const DEFAULT_PROVIDER_PAUSE: Duration = Duration::from_secs(1);

/// The configured limits: a default for every model and per-model
/// overrides (each override replaces only the limits it names).
#[derive(Debug, Clone, Default)]
pub struct BudgetConfig {
    /// Limits of every model without an override.
    pub default: Limits,
    /// Per-model overrides.
    pub models: HashMap<String, Limits>,
    /// The "minute" of the per-minute limits (shorter in tests).
    pub window: Duration,
    /// How long a call's capacity stays taken if its worker dies.
    pub lease: Duration,
}

/// One model's entry in `CHATQ_LLM_MODEL_LIMITS` (JSON).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelLimits {
    max_concurrency: Option<u32>,
    requests_per_minute: Option<f64>,
    tokens_per_minute: Option<f64>,
}

impl BudgetConfig {
    /// Parses `CHATQ_LLM_MODEL_LIMITS`: a JSON object from model name to
    /// `{"max_concurrency"?, "requests_per_minute"?, "tokens_per_minute"?}`.
    pub fn parse_overrides(json: &str) -> Result<HashMap<String, ModelOverride>, String> {
        let raw: HashMap<String, ModelLimits> =
            serde_json::from_str(json).map_err(|e| format!("CHATQ_LLM_MODEL_LIMITS: {e}"))?;
        let mut out = HashMap::new();
        for (model, l) in raw {
            for (name, v) in [
                ("requests_per_minute", l.requests_per_minute),
                ("tokens_per_minute", l.tokens_per_minute),
            ] {
                if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                    return Err(format!(
                        "CHATQ_LLM_MODEL_LIMITS: {model}.{name} must be a positive number"
                    ));
                }
            }
            if l.max_concurrency == Some(0) {
                return Err(format!(
                    "CHATQ_LLM_MODEL_LIMITS: {model}.max_concurrency must be at least 1"
                ));
            }
            out.insert(
                model,
                ModelOverride {
                    max_concurrency: l.max_concurrency,
                    requests: l.requests_per_minute,
                    tokens: l.tokens_per_minute,
                },
            );
        }
        Ok(out)
    }

    /// The limits of `model`.
    pub fn limits(&self, model: &str) -> Limits {
        self.models.get(model).copied().unwrap_or(self.default)
    }
}

/// A per-model override as parsed (per-minute figures).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelOverride {
    /// Calls in flight.
    pub max_concurrency: Option<u32>,
    /// Requests per minute.
    pub requests: Option<f64>,
    /// Tokens per minute.
    pub tokens: Option<f64>,
}

impl ModelOverride {
    /// The override applied over `default`.
    pub fn over(self, default: Limits) -> Limits {
        Limits {
            max_concurrency: self.max_concurrency.or(default.max_concurrency),
            requests: self.requests.or(default.requests),
            tokens: self.tokens.or(default.tokens),
        }
    }
}

/// Capacity taken for one call; give it back with [`Budget::release`].
#[derive(Debug)]
pub struct Permit {
    call: Uuid,
    limits: Limits,
}

/// How waiting for capacity ended.
#[derive(Debug)]
pub enum Acquired {
    /// The call may start (with a permit when the model has limits).
    Ready(Option<Permit>),
    /// Not within the allowed wait; capacity is expected after this long.
    Later(Duration),
    /// Stopped while waiting.
    Stopped,
}

struct Pause {
    until: Instant,
    spread: Duration,
}

/// This process's side of the shared budget.
pub struct Budget {
    db: PgPool,
    config: BudgetConfig,
    pauses: Mutex<HashMap<String, Pause>>,
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    released: Notify,
}

impl Budget {
    /// The budget; the process's listener (`crate::cancels`) feeds it
    /// releases and pauses ([`Budget::notified`], [`Budget::relistened`]).
    pub fn new(db: PgPool, mut config: BudgetConfig) -> Arc<Self> {
        let usable = |l: &mut Limits| {
            l.requests = l.requests.map(|n| n * USABLE_SHARE);
            l.tokens = l.tokens.map(|n| n * USABLE_SHARE);
        };
        usable(&mut config.default);
        config.models.values_mut().for_each(usable);
        Arc::new(Self {
            db,
            config,
            pauses: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            released: Notify::new(),
        })
    }

    /// Whether any model has limits (then capacity is taken before a job
    /// is claimed).
    pub fn is_limited(&self) -> bool {
        self.config.default.is_limited() || self.config.models.values().any(Limits::is_limited)
    }

    /// Whether the provider paused any model (then capacity is checked
    /// before a job is claimed, so a paused job stays queued).
    pub fn is_provider_paused(&self) -> bool {
        let now = Instant::now();
        lock(&self.pauses).values().any(|p| p.until > now)
    }

    /// Waits until a call of `model` reserving `tokens` may start: through
    /// the provider's pause and, when the model has limits, until the
    /// shared budget has room. With `max_wait`, gives up (`Later`) when
    /// capacity is not expected within it.
    pub async fn acquire(
        &self,
        model: &str,
        tokens: i32,
        max_wait: Option<Duration>,
        stop: &CancellationToken,
    ) -> Acquired {
        let deadline = max_wait.map(|w| Instant::now() + w);
        let too_late = |wake: Instant| deadline.is_some_and(|d| wake > d);
        if let Some(wake) = self.resume_point(model) {
            if too_late(wake) {
                return Acquired::Later(wake - Instant::now());
            }
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = stop.cancelled() => return Acquired::Stopped,
            }
        }
        let limits = self.config.limits(model);
        if !limits.is_limited() {
            return Acquired::Ready(None);
        }
        let gate = self.gate(model);
        let _turn = tokio::select! {
            turn = gate.lock() => turn,
            () = stop.cancelled() => return Acquired::Stopped,
            () = chatq_common::time::sleep_until(deadline) => {
                return Acquired::Later(max_wait.unwrap_or_default());
            }
        };
        loop {
            let call = Uuid::new_v4();
            // Registered before asking: a release announced meanwhile wakes us.
            let released = self.released.notified();
            let asked = llm_budget::acquire(
                &self.db,
                model,
                call,
                tokens,
                &limits,
                self.config.window,
                self.config.lease,
            )
            .await;
            let wait = match asked {
                Ok(None) => return Acquired::Ready(Some(Permit { call, limits })),
                Ok(Some(wait)) => wait,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the LLM budget; waiting");
                    DB_RETRY
                }
            };
            let wake = Instant::now() + wait;
            if too_late(wake) {
                return Acquired::Later(wait);
            }
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = released => {}
                () = stop.cancelled() => return Acquired::Stopped,
            }
        }
    }

    /// Gives a call's capacity back: `used` is what the provider counted
    /// (prompt and reply tokens), `sent` whether the request went out.
    pub async fn release(&self, permit: Permit, used: Option<i32>, sent: bool) {
        if let Err(err) =
            llm_budget::release(&self.db, permit.call, used, sent, &permit.limits).await
        {
            // The lease gives it back when it lapses.
            tracing::warn!(error = %err, "could not give LLM capacity back");
        }
    }

    /// The provider asked to stop calling `model` for `pause`: every worker
    /// stops, then resumes over a spread window.
    pub async fn provider_pause(&self, model: &str, pause: Duration) {
        let spread = pause.clamp(MIN_SPREAD, MAX_SPREAD);
        self.note_pause(model, pause, spread);
        tracing::warn!(
            model,
            pause_ms = pause.as_millis(),
            "the LLM provider asked to slow down: every worker pauses this model"
        );
        if let Err(err) = llm_budget::pause(&self.db, model, pause, spread).await {
            tracing::warn!(error = %err, "could not share the provider's pause");
        }
    }

    /// When a waiter may call `model` again, if the provider paused it: a
    /// random point of the spread window after the pause.
    fn resume_point(&self, model: &str) -> Option<Instant> {
        let pauses = lock(&self.pauses);
        let pause = pauses.get(model)?;
        (pause.until > Instant::now()).then(|| pause.until + pause.spread.mul_f64(fastrand::f64()))
    }

    fn note_pause(&self, model: &str, pause: Duration, spread: Duration) {
        let until = Instant::now() + pause;
        let mut pauses = lock(&self.pauses);
        let entry = pauses
            .entry(model.to_owned())
            .or_insert(Pause { until, spread });
        if entry.until < until {
            *entry = Pause { until, spread };
        }
    }

    fn gate(&self, model: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(lock(&self.gates).entry(model.to_owned()).or_default())
    }

    /// After the listener (re)connected: pauses announced while no one
    /// listened are read back, and waiters ask again.
    pub async fn relistened(&self) {
        match llm_budget::active_pauses(&self.db).await {
            Ok(active) => {
                for (model, left, spread) in active {
                    self.note_pause(&model, secs(left), secs(spread));
                }
            }
            Err(err) => tracing::debug!(error = %err, "cannot read pauses"),
        }
        self.released.notify_waiters();
    }

    /// A notification on the budget's channels (releases, pauses).
    pub fn notified(&self, channel: &str, payload: &str) {
        if channel == PAUSE_CHANNEL {
            if let Ok(p) = serde_json::from_str::<PauseNote>(payload) {
                let left = p.until - now_epoch();
                self.note_pause(&p.model, secs(left), secs(p.spread));
            }
        } else {
            self.released.notify_waiters();
        }
    }
}

#[derive(Deserialize)]
struct PauseNote {
    model: String,
    until: f64,
    spread: f64,
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.clamp(0.0, 3600.0)).unwrap_or_default()
}

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_only_the_limits_they_name() {
        let o = BudgetConfig::parse_overrides(
            r#"{"gpt-4o": {"max_concurrency": 5}, "llama3:8b": {"requests_per_minute": 60}}"#,
        )
        .unwrap_or_default();
        let default = Limits {
            max_concurrency: Some(10),
            requests: Some(100.0),
            tokens: None,
        };
        let gpt = o.get("gpt-4o").map(|m| m.over(default));
        assert_eq!(gpt.and_then(|l| l.max_concurrency), Some(5));
        assert_eq!(gpt.and_then(|l| l.requests), Some(100.0));
        let llama = o.get("llama3:8b").map(|m| m.over(default));
        assert_eq!(llama.and_then(|l| l.requests), Some(60.0));
        assert_eq!(llama.and_then(|l| l.max_concurrency), Some(10));
    }

    #[test]
    fn bad_overrides_are_refused_with_the_setting_named() {
        for bad in [
            "[1]",
            r#"{"m": {"rpm": 1}}"#,
            r#"{"m": {"max_concurrency": 0}}"#,
            r#"{"m": {"requests_per_minute": -1}}"#,
        ] {
            let err = BudgetConfig::parse_overrides(bad).err().unwrap_or_default();
            assert!(err.starts_with("CHATQ_LLM_MODEL_LIMITS"), "{bad}: {err}");
        }
    }
}
