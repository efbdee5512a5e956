//! Domain types shared by the api and the worker.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Lifecycle of a job. `succeeded`, `failed` and `cancelled` are terminal: a
/// terminal job never changes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum JobStatus {
    /// Stored and waiting for a worker.
    Queued,
    /// Claimed by a worker, LLM call in progress.
    Running,
    /// The assistant reply is stored.
    Succeeded,
    /// Gave up; `error_code` says why.
    Failed,
    /// Cancelled by the client or by deleting its conversation.
    Cancelled,
}

impl JobStatus {
    /// Whether the job can never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum Role {
    /// The conversation's system prompt.
    System,
    /// The client.
    User,
    /// The LLM's reply, written by a worker.
    Assistant,
}

/// A job row as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    /// Job id (uuid v7).
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: Uuid,
    /// Conversation the job answers in.
    pub conversation_id: Uuid,
    /// Current state.
    pub status: JobStatus,
    /// Model name passed to the LLM.
    pub model: String,
    /// Completion token cap, if the client set one.
    pub max_tokens: Option<i32>,
    /// Sampling temperature, if the client set one.
    pub temperature: Option<f64>,
    /// LLM attempts started so far.
    pub attempts: i32,
    /// Token of the current claim; a worker may only finish the job it claimed.
    pub claim_token: Option<Uuid>,
    /// The assistant message written on success.
    pub result_message_id: Option<Uuid>,
    /// The assistant reply on success.
    pub result_content: Option<String>,
    /// The LLM's finish reason on success.
    pub finish_reason: Option<String>,
    /// Prompt tokens reported by the LLM.
    pub prompt_tokens: Option<i32>,
    /// Completion tokens reported by the LLM.
    pub completion_tokens: Option<i32>,
    /// Error code on failure.
    pub error_code: Option<String>,
    /// Human-readable error on failure.
    pub error_message: Option<String>,
    /// Why earlier attempts failed: `[{attempt, code, message, at}]`.
    pub attempt_errors: serde_json::Value,
    /// When the job was submitted.
    pub created_at: DateTime<Utc>,
    /// When the first attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the job became terminal.
    pub finished_at: Option<DateTime<Utc>>,
    /// Text the running attempt has streamed so far, as last saved.
    pub partial_content: Option<String>,
    /// The attempt `partial_content` belongs to.
    pub partial_attempt: Option<i32>,
    /// Upstream sampling parameters forwarded unchanged (a JSON object).
    pub sampling: Option<serde_json::Value>,
    /// The lane the job waits in.
    pub priority: Priority,
    /// Estimated tokens (prompt and reply): the unit of fairness between
    /// tenants and the reservation against a tokens-per-minute budget.
    pub cost: i32,
    /// Place in the start order within its lane (start-time fair queueing).
    pub start_tag: f64,
    /// A retry waiting out its delay does not start before this.
    pub not_before: Option<DateTime<Utc>>,
    /// W3C `traceparent` of the submitting request.
    pub trace_parent: Option<String>,
}

impl Job {
    /// The job's key in the start order: lane (interactive first), start
    /// tag, id.
    pub fn start_key(&self) -> StartKey {
        StartKey {
            batch: self.priority == Priority::Batch,
            tag: self.start_tag,
            id: self.id,
        }
    }
}

/// A queued job's key in the order jobs start in.
#[derive(Debug, Clone, Copy, PartialEq, sqlx::FromRow)]
pub struct StartKey {
    /// In the batch lane (which starts after the interactive lane).
    pub batch: bool,
    /// Start tag within the lane.
    pub tag: f64,
    /// Ties broken by id.
    pub id: Uuid,
}

impl StartKey {
    /// Total order of start keys (tags are finite).
    pub fn cmp_order(&self, other: &Self) -> std::cmp::Ordering {
        self.batch
            .cmp(&other.batch)
            .then(self.tag.total_cmp(&other.tag))
            .then(self.id.cmp(&other.id))
    }
}

/// The lane a job waits in: batch work runs on capacity interactive work
/// leaves idle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum Priority {
    /// A person is waiting (the default).
    #[default]
    Interactive,
    /// Nobody is waiting.
    Batch,
}

/// A conversation row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Conversation {
    /// Conversation id (uuid v7).
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: Uuid,
    /// Instructions always sent first to the LLM.
    pub system_prompt: Option<String>,
    /// Default model of the conversation's jobs.
    pub model: String,
    /// Client-defined metadata (a JSON object).
    pub metadata: serde_json::Value,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// A message row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Message {
    /// Message id (uuid v7).
    pub id: Uuid,
    /// Author.
    pub role: Role,
    /// Text.
    pub content: String,
    /// The job that the message started (user) or answered (assistant).
    pub job_id: Option<Uuid>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// The message published on the work queue: ids only, tagged and versioned.
/// The job row in PostgreSQL is the truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum QueueMessage {
    /// Run the chat job with this id.
    ChatV1 {
        /// The job to run.
        job_id: Uuid,
    },
}

impl QueueMessage {
    /// The job this message is about.
    pub fn job_id(&self) -> Uuid {
        match self {
            Self::ChatV1 { job_id } => *job_id,
        }
    }
}

/// A new uuid v7 (time ordered, index friendly).
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

/// A piece of streamed reply text, published by the worker on the events
/// exchange (routing key: the job id) and fanned out by each api process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaEvent {
    /// The job.
    pub job_id: Uuid,
    /// The attempt that produced the text.
    pub attempt: i32,
    /// Characters (Unicode scalar values) of this attempt's text before it.
    pub offset: u64,
    /// The text.
    pub content: String,
}
