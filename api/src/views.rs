//! The JSON shapes of API.md's resources.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use chatq_common::domain::{Conversation, Job, JobStatus, Message, Role};

/// The job object, the same everywhere a job is returned.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Job)]
pub struct JobView {
    id: Uuid,
    conversation_id: Uuid,
    #[schema(value_type = crate::openapi::JobStatusSchema)]
    status: JobStatus,
    model: String,
    attempts: i32,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    /// Why earlier attempts failed: `[{attempt, code, message, at}]`.
    #[schema(value_type = Vec<crate::openapi::AttemptErrorSchema>)]
    attempt_errors: serde_json::Value,
    /// Present only when `succeeded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<JobResultView>,
    /// Present only when `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorView>,
    /// Present only while `queued`: the job's place in the start order.
    #[serde(skip_serializing_if = "Option::is_none")]
    queue: Option<QueueView>,
}

/// Where a queued job stands: its place in the order jobs will actually be
/// started (1 = next) and when it is expected to start.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[schema(as = JobQueue)]
pub struct QueueView {
    /// 1 = the next job to start.
    pub position: i64,
    /// Expected start time.
    pub estimated_start_at: DateTime<Utc>,
}

impl JobView {
    /// Adds the queue position of a queued job (ignored in other states).
    #[must_use]
    pub fn with_queue(mut self, queue: Option<QueueView>) -> Self {
        if self.status == JobStatus::Queued {
            self.queue = queue;
        }
        self
    }
}

/// The answer of a succeeded job.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobResult)]
struct JobResultView {
    message_id: Option<Uuid>,
    content: String,
    finish_reason: Option<String>,
    usage: UsageView,
}

/// Tokens the answer used.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Usage)]
struct UsageView {
    prompt_tokens: i32,
    completion_tokens: i32,
    /// Wider than its parts: two counts near `i32::MAX` must not wrap.
    total_tokens: i64,
}

/// Why a failed job failed.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobError)]
struct ErrorView {
    code: String,
    message: String,
}

impl From<Job> for JobView {
    fn from(j: Job) -> Self {
        let result = (j.status == JobStatus::Succeeded).then(|| {
            let prompt_tokens = j.prompt_tokens.unwrap_or(0);
            let completion_tokens = j.completion_tokens.unwrap_or(0);
            JobResultView {
                message_id: j.result_message_id,
                content: j.result_content.unwrap_or_default(),
                finish_reason: j.finish_reason,
                usage: UsageView {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: i64::from(prompt_tokens) + i64::from(completion_tokens),
                },
            }
        });
        let error = (j.status == JobStatus::Failed).then(|| ErrorView {
            code: j.error_code.unwrap_or_else(|| "internal_error".to_owned()),
            message: j.error_message.unwrap_or_default(),
        });
        Self {
            id: j.id,
            conversation_id: j.conversation_id,
            status: j.status,
            model: j.model,
            attempts: j.attempts,
            created_at: j.created_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            attempt_errors: j.attempt_errors,
            result,
            error,
            queue: None,
        }
    }
}

/// A conversation.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Conversation)]
pub struct ConversationView {
    id: Uuid,
    system_prompt: Option<String>,
    model: String,
    /// The client's metadata, a JSON object.
    #[schema(value_type = Object)]
    metadata: serde_json::Value,
    created_at: DateTime<Utc>,
}

impl From<Conversation> for ConversationView {
    fn from(c: Conversation) -> Self {
        Self {
            id: c.id,
            system_prompt: c.system_prompt,
            model: c.model,
            metadata: c.metadata,
            created_at: c.created_at,
        }
    }
}

/// A message of a conversation.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Message)]
pub struct MessageView {
    id: Uuid,
    #[schema(value_type = crate::openapi::RoleSchema)]
    role: Role,
    content: String,
    job_id: Option<Uuid>,
    created_at: DateTime<Utc>,
}

impl From<Message> for MessageView {
    fn from(m: Message) -> Self {
        Self {
            id: m.id,
            role: m.role,
            content: m.content,
            job_id: m.job_id,
            created_at: m.created_at,
        }
    }
}

/// A page of a list: `data` and the cursor of the next page.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    data: Vec<T>,
    /// Pass as `after` to get the next page; `null` on the last page.
    next_after: Option<Uuid>,
}

impl<T> Page<T> {
    /// A page from rows fetched with `limit + 1` (the extra row only says
    /// that there is a next page) and cut to the page size budget.
    pub fn from_rows<R>(
        cut: chatq_common::db::Cut<R>,
        limit: i64,
        id: impl Fn(&R) -> Uuid,
        view: impl Fn(R) -> T,
    ) -> Self {
        let mut rows = cut.rows;
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        // Rows left out for size also mean a next page.
        let more = rows.len() > limit || cut.truncated;
        rows.truncate(limit);
        let next_after = if more { rows.last().map(&id) } else { None };
        Self {
            data: rows.into_iter().map(view).collect(),
            next_after,
        }
    }
}
