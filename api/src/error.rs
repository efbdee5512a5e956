//! The one HTTP error type: every failure becomes the API's error body
//! `{"error": {"code", "message"}}` with the status API.md gives it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Seconds a client is asked to wait after a 503.
const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 2;
/// Seconds a client is asked to wait when the process sheds load: a request
/// slot frees up as soon as any in-flight request ends.
const OVERLOADED_RETRY_AFTER_SECS: u64 = 1;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed or invalid input; the message names the field.
    #[error("{0}")]
    InvalidRequest(String),
    /// 401: missing, malformed, unknown or revoked credentials.
    #[error("missing or invalid credentials")]
    Unauthorized,
    /// 404: no such resource for this tenant, or no such route.
    #[error("{0}")]
    NotFound(&'static str),
    /// 405: the route exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409: the conversation already has a queued or running job.
    #[error("the conversation already has a queued or running job")]
    ConversationBusy,
    /// 409: the request conflicts with the resource's state.
    #[error("{0}")]
    Conflict(&'static str),
    /// 413: the body is over the limit. The connection is closed after the
    /// answer, since the rest of the body may never be read.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 400: the body did not arrive within `CHATQ_BODY_READ_TIMEOUT_SECS`
    /// (seconds); the connection is closed after the answer.
    #[error("request body not received within {0} s")]
    BodyTimeout(u64),
    /// 415: the body is not JSON.
    #[error("request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    /// 429: the tenant is over its rate limit.
    #[error("rate limit exceeded")]
    RateLimited {
        /// Seconds until a retry can succeed.
        retry_after_secs: u64,
    },
    /// 429: the work queue is at its maximum length.
    #[error("the work queue is full, retry later")]
    QueueFull {
        /// Seconds the client should wait.
        retry_after_secs: u64,
    },
    /// 503: the database or broker cannot take the request now.
    #[error("{0} is unavailable, retry later")]
    Unavailable(&'static str),
    /// 503: the broker is unreachable and the jobs waiting to be published
    /// reached their bound; nothing was stored.
    #[error("the broker is unavailable and the backlog waiting for it is full, retry later")]
    OutboxFull {
        /// Seconds the client should wait.
        retry_after_secs: u64,
    },
    /// 503: `CHATQ_MAX_IN_FLIGHT_REQUESTS` requests are being handled; this
    /// one is refused at once rather than queued.
    #[error("the server is at capacity, retry later")]
    Overloaded,
    /// 503: the request was not handled within `CHATQ_REQUEST_TIMEOUT_SECS`
    /// (seconds).
    #[error("the request was not handled within {0} s, retry later")]
    TimedOut(u64),
    /// 500: a bug or an unexpected failure; logged, never shown.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if chatq_common::db::is_unavailable(&err) {
            tracing::warn!(error = %err, "database unavailable");
            Self::Unavailable("the database")
        } else if is_transient(&err) {
            // Not a bug of this request: retrying it can succeed.
            tracing::warn!(error = %err, "statement aborted for a conflict with a concurrent transaction");
            Self::Unavailable("the database")
        } else {
            Self::Internal(err.into())
        }
    }
}

/// Whether PostgreSQL aborted the statement for a conflict with a
/// concurrent transaction (`40P01` deadlock_detected, `40001`
/// serialization_failure): running it again can succeed.
pub fn is_transient(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().is_some_and(|c| c == "40P01" || c == "40001"))
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) | Self::BodyTimeout(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::ConversationBusy | Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited { .. } | Self::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_)
            | Self::OutboxFull { .. }
            | Self::Overloaded
            | Self::TimedOut(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) | Self::BodyTimeout(_) => "invalid_request",
            Self::Unauthorized => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::ConversationBusy => "conversation_busy",
            Self::Conflict(_) => "conflict",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RateLimited { .. } => "rate_limited",
            Self::QueueFull { .. } => "queue_full",
            Self::Unavailable(_)
            | Self::OutboxFull { .. }
            | Self::Overloaded
            | Self::TimedOut(_) => "unavailable",
            Self::Internal(_) => "internal_error",
        }
    }

    /// Seconds the client is asked to wait, for the answers that carry `Retry-After`.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after_secs }
            | Self::QueueFull { retry_after_secs }
            | Self::OutboxFull { retry_after_secs } => Some(*retry_after_secs),
            Self::Unavailable(_) | Self::TimedOut(_) => Some(UNAVAILABLE_RETRY_AFTER_SECS),
            Self::Overloaded => Some(OVERLOADED_RETRY_AFTER_SECS),
            _ => None,
        }
    }

    /// Whether the connection must close after this answer: the request
    /// body was left unread, and reading it could take forever.
    fn closes_connection(&self) -> bool {
        matches!(self, Self::PayloadTooLarge(_) | Self::BodyTimeout(_))
    }

    /// A 400 naming what was wrong.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidRequest(message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = match &self {
            Self::Internal(err) => {
                // Logged once here, inside the request span; the client gets generic text.
                tracing::error!(error = ?err, "internal error");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message,
            },
        };
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.closes_connection() {
            // hyper then closes the connection after this response instead
            // of waiting for the rest of the body.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// The body of every error answer (except the OpenAI facade's):
/// `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": {"code": "not_found", "message": "no such job"}}))]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The error of an [`ErrorBody`].
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable, snake_case: `invalid_request`, `unauthorized`,
    /// `not_found`, `method_not_allowed`, `conversation_busy`, `conflict`,
    /// `payload_too_large`, `unsupported_media_type`, `rate_limited`,
    /// `queue_full` or `unavailable`.
    pub code: &'static str,
    /// For people; a 400 names the offending field first (`content: ...`).
    pub message: String,
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;
