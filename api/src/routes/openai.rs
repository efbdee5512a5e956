//! The OpenAI-compatible front door: `POST /v1/chat/completions` (plain and
//! streamed) and `GET /v1/models[/{id}]`. A completion is an ordinary chatq
//! job (stored before anything goes upstream, queued, retried, visible at
//! `GET /v1/jobs/{id}`), which the request then waits for.
//!
//! What an OpenAI client sees when an attempt fails after it streamed part
//! of its text (the event stream has `reset`; OpenAI's chunks have nothing
//! like it): the retry's text is compared with what the client already has.
//! While it repeats it, nothing is sent; once it goes further, the new text
//! follows seamlessly. If it says something else, the stream ends with an
//! OpenAI error event (`code: stream_diverged`) and the job is cancelled, as
//! for a client that left: the client never receives text that is not a
//! prefix of one answer.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::stream;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use utoipa::ToSchema;
use uuid::Uuid;

use chatq_common::db::jobs;
use chatq_common::domain::{Job, JobStatus};

use crate::AppState;
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::follow::{self, Position, StreamItem};
use crate::openai::{
    self, ChunkDelta, CompletionRequest, OpenAiError, OpenAiErrorBody, OpenAiErrorDetail,
    event_data,
};
use crate::routes::conversations::NewConversation;
use crate::routes::submit::idempotency;
use crate::submission::{self, Target, TurnInput};
use crate::trace::TraceContext;

/// A waiting request re-reads its job at least this often.
const WAIT_RECHECK: Duration = Duration::from_secs(5);
/// Keep-alive comment interval of a streamed completion.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Header naming the chatq job behind a completion.
const JOB_ID_HEADER: &str = "x-chatq-job-id";

type Answer = Result<Response, OpenAiError>;

/// `POST /v1/chat/completions`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    operation_id = "createChatCompletion",
    tag = "openai",
    summary = "Create a chat completion (OpenAI-compatible)",
    description = "OpenAI's request and response format; the official SDKs work against it with `base_url` set to the service. The completion is an ordinary chatq job (stored, queued, retried, visible at `GET /v1/jobs/{id}`) which the request waits for, at most `CHATQ_COMPLETIONS_TIMEOUT_SECS`. With `stream: true` the answer is a `text/event-stream` of `chat.completion.chunk` events (`data:` lines) ending with `data: [DONE]`, or with an error event in OpenAI's error shape. A client that disconnects before its answer cancels the job. Errors use OpenAI's shape.",
    params(crate::openapi::IdempotencyKey),
    request_body = openai::CompletionRequestSchema,
    responses(
        (status = 200, description = "The completion (`stream: false`), or its chunks (`stream: true`).",
            content(
                (openai::ChatCompletion = "application/json"),
                (crate::openapi::CompletionEvent = "text/event-stream"),
            ),
            headers(("x-chatq-job-id" = Uuid, description = "The chatq job behind the completion."))),
        (status = 400, response = crate::openapi::OpenAiBadRequest),
        (status = 401, response = crate::openapi::OpenAiUnauthorized),
        (status = 404, response = crate::openapi::OpenAiNotFound),
        (status = 409, response = crate::openapi::OpenAiConflict),
        (status = 413, response = crate::openapi::OpenAiPayloadTooLarge),
        (status = 415, response = crate::openapi::OpenAiUnsupportedMediaType),
        (status = 429, response = crate::openapi::OpenAiTooManyRequests),
        (status = 500, response = crate::openapi::OpenAiJobError),
        (status = 502, response = crate::openapi::OpenAiBadGateway),
        (status = 503, response = crate::openapi::OpenAiUnavailable),
        (status = 504, response = crate::openapi::OpenAiGatewayTimeout),
    ),
    security(("api_key" = [])),
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    tenant: Result<Tenant, ApiError>,
    headers: HeaderMap,
    Extension(trace): Extension<TraceContext>,
    body: Result<JsonBody<serde_json::Map<String, Value>>, ApiError>,
) -> Answer {
    let tenant = tenant?;
    let JsonBody(body) = body?;
    let idempotency = idempotency(&headers, &("openai", &body))?;
    let mut request = CompletionRequest::parse(body, state.config.max_content_chars)?;
    if !state.config.models.is_empty() && !state.config.models.contains(&request.model) {
        return Err(OpenAiError::model_not_found(&request.model));
    }
    let conversation = NewConversation {
        system_prompt: request.system_prompt.clone(),
        model: request.model.clone(),
        metadata: json!({ "source": "openai" }),
    };
    let turn = TurnInput {
        content: request.content.clone(),
        model: None,
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        priority: request.priority,
        sampling: (!request.sampling.is_empty()).then(|| Value::Object(request.sampling.clone())),
        trace_parent: Some(trace.traceparent()),
    };
    // A single turn (the common SDK call) is stored like any submission,
    // batched with concurrent ones; earlier turns need a transaction.
    let target = if request.history.is_empty() {
        Target::New(conversation)
    } else {
        Target::NewWithHistory(conversation, std::mem::take(&mut request.history))
    };
    let job = submission::submit(&state, &tenant, target, turn, idempotency.as_ref()).await?;
    // From here on, a client that leaves cancels the job.
    let guard = CancelOnDrop::new(&state, tenant, job.id);
    let job_header = HeaderValue::from_str(&job.id.to_string()).ok();
    let mut response = if request.stream {
        stream_completion(state, tenant, job, request.include_usage, guard).await?
    } else {
        wait_for_completion(&state, tenant, job, guard).await?
    };
    if let Some(value) = job_header {
        response
            .headers_mut()
            .insert(HeaderName::from_static(JOB_ID_HEADER), value);
    }
    Ok(response)
}

/// Waits (holding no database connection) until the job is terminal.
async fn wait_for_completion(
    state: &AppState,
    tenant: Tenant,
    job: Job,
    guard: CancelOnDrop,
) -> Answer {
    let timeout = state.config.completions_timeout;
    let deadline = Instant::now() + timeout;
    let mut changes = state.hub.subscribe(job.id);
    let mut job = job;
    loop {
        // Read after subscribing, so a change in between is not missed. A
        // database hiccup while waiting is not the client's problem: wait on.
        match jobs::get(&state.db, tenant.id, job.id).await {
            Ok(Some(current)) => job = current,
            Ok(None) => return Err(OpenAiError::from_job(&cancelled(job))),
            Err(err) => {
                tracing::warn!(error = %err, "completion could not re-read its job; waiting on")
            }
        }
        if job.status.is_terminal() {
            break;
        }
        if Instant::now() >= deadline {
            // The guard cancels the job.
            drop(guard);
            return Err(OpenAiError::timed_out(timeout.as_secs()));
        }
        let recheck = (Instant::now() + WAIT_RECHECK).min(deadline);
        tokio::select! {
            () = changes.changed() => {}
            () = tokio::time::sleep_until(recheck) => {}
            // The api is stopping: the guard cancels the job; the SDK retries the 503.
            () = state.shutdown.cancelled() => {
                return Err(ApiError::Unavailable("the api (shutting down)").into());
            }
        }
    }
    guard.disarm();
    if job.status == JobStatus::Succeeded {
        Ok(Json(openai::completion(&job)).into_response())
    } else {
        Err(OpenAiError::from_job(&job))
    }
}

/// The job as a cancelled one (it vanished with its conversation).
fn cancelled(mut job: Job) -> Job {
    job.status = JobStatus::Cancelled;
    job
}

/// Streams the completion as `chat.completion.chunk` events.
async fn stream_completion(
    state: AppState,
    tenant: Tenant,
    job: Job,
    include_usage: bool,
    guard: CancelOnDrop,
) -> Answer {
    let sub = state.hub.subscribe_with_text(job.id).await;
    let current = jobs::get(&state.db, tenant.id, job.id)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| OpenAiError::from_job(&cancelled(job.clone())))?;
    let timeout = state.config.completions_timeout;
    let items = follow::start(state, tenant, sub, current, Position::default());
    let (tx, rx) = mpsc::channel::<Event>(16);
    tokio::spawn(translate(items, tx, job, include_usage, timeout, guard));
    let events = stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        Some((Ok::<_, Infallible>(event), rx))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// Turns followed items into OpenAI chunks; ends with `data: [DONE]`, or an
/// error event. Dropping the client (its receiver) drops the guard, which
/// cancels the job.
async fn translate(
    mut items: mpsc::Receiver<StreamItem>,
    tx: mpsc::Sender<Event>,
    job: Job,
    include_usage: bool,
    timeout: Duration,
    guard: CancelOnDrop,
) {
    let send = |data: String| {
        let tx = tx.clone();
        async move { tx.send(Event::default().data(data)).await.is_ok() }
    };
    let role = openai::chunk(&job, Some(ChunkDelta::role()), None, None);
    if !send(event_data(&role)).await {
        return;
    }
    let mut text = TextGuard::default();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        let item = tokio::select! {
            item = items.recv() => item,
            () = &mut deadline => {
                let _ = send(event_data(&OpenAiError::timed_out(timeout.as_secs()).body())).await;
                return; // the guard cancels the job
            }
            () = tx.closed() => return,
        };
        let Some(item) = item else {
            // Deleted with its conversation, or the api is stopping.
            let _ = send(event_data(
                &OpenAiError::from_job(&cancelled(job.clone())).body(),
            ))
            .await;
            return;
        };
        match item {
            StreamItem::Status(..) => {}
            StreamItem::Reset(..) => text.reset(),
            StreamItem::Delta(piece, _) => match text.accept(&piece) {
                Some(new) if new.is_empty() => {}
                Some(new) => {
                    let chunk = openai::chunk(&job, Some(ChunkDelta::text(new)), None, None);
                    if !send(event_data(&chunk)).await {
                        return;
                    }
                }
                None => {
                    let _ = send(diverged()).await;
                    return;
                }
            },
            StreamItem::Done(done, _) => {
                if done.status != JobStatus::Succeeded {
                    guard.disarm();
                    let _ = send(event_data(&OpenAiError::from_job(&done).body())).await;
                    return;
                }
                if done.result_content.as_deref().unwrap_or_default() != text.sent {
                    // A retry shorter than what was sent: the client holds
                    // text that is not the answer.
                    let _ = send(diverged()).await;
                    return; // the job already succeeded; nothing to cancel
                }
                guard.disarm();
                let finish = done.finish_reason.as_deref().unwrap_or("stop");
                let last = openai::chunk(&done, Some(ChunkDelta::default()), Some(finish), None);
                let _ = send(event_data(&last)).await;
                if include_usage {
                    let usage = openai::chunk(&done, None, None, Some(openai::usage(&done)));
                    let _ = send(event_data(&usage)).await;
                }
                let _ = tx.send(Event::default().data("[DONE]")).await;
                return;
            }
        }
    }
}

/// The error event of a stream whose retry said something else than what
/// the client was sent.
fn diverged() -> String {
    event_data(&OpenAiErrorBody {
        error: OpenAiErrorDetail {
            message: "the model's answer was interrupted and its retry said something else"
                .to_owned(),
            kind: "server_error",
            param: None,
            code: Some("stream_diverged".to_owned()),
        },
    })
}

/// What an OpenAI client has been sent, and a retry's text checked
/// against it.
#[derive(Default)]
struct TextGuard {
    sent: String,
    /// Bytes of a retry's text seen so far (`None`: no retry).
    retry: Option<usize>,
}

impl TextGuard {
    fn reset(&mut self) {
        self.retry = Some(0);
    }

    /// The part of `piece` to send (possibly empty), or `None` if the
    /// retry contradicts what was sent.
    fn accept(&mut self, piece: &str) -> Option<String> {
        let Some(seen) = self.retry else {
            self.sent.push_str(piece);
            return Some(piece.to_owned());
        };
        let overlap = piece.len().min(self.sent.len() - seen);
        if piece.as_bytes()[..overlap] != self.sent.as_bytes()[seen..seen + overlap] {
            return None;
        }
        self.retry = Some(seen + piece.len());
        // Equal bytes up to the end of `sent`: a character boundary of `piece`.
        let new = piece.get(overlap..)?.to_owned();
        self.sent.push_str(&new);
        Some(new)
    }
}

/// Cancels the job when dropped while armed: the client left, or timed out.
struct CancelOnDrop {
    state: Option<(AppState, Tenant, Uuid)>,
}

impl CancelOnDrop {
    fn new(state: &AppState, tenant: Tenant, id: Uuid) -> Self {
        Self {
            state: Some((state.clone(), tenant, id)),
        }
    }

    fn disarm(mut self) {
        self.state = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some((state, tenant, id)) = self.state.take() {
            tokio::spawn(async move {
                match jobs::cancel(&state.db, tenant.id, id).await {
                    Ok(Some(_)) => {
                        tracing::info!(job_id = %id, "completion abandoned by its client; job cancelled")
                    }
                    Ok(None) => {}
                    Err(err) => {
                        tracing::warn!(job_id = %id, error = %err, "could not cancel an abandoned completion's job")
                    }
                }
            });
        }
    }
}

/// The models offered: `CHATQ_MODELS`, or the default model.
fn offered(state: &AppState) -> Vec<String> {
    if state.config.models.is_empty() {
        vec![state.config.default_model.clone()]
    } else {
        state.config.models.clone()
    }
}

/// A model, in OpenAI's shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct Model {
    /// The model's name.
    pub id: String,
    /// `model`.
    #[schema(value_type = String)]
    pub object: &'static str,
    /// Unix time, in seconds (the api's start: no creation date is known).
    pub created: u64,
    /// `chatq`.
    #[schema(value_type = String)]
    pub owned_by: &'static str,
}

/// The models offered, in OpenAI's list shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    #[schema(value_type = String)]
    pub object: &'static str,
    /// The models (`CHATQ_MODELS`, or the default model).
    pub data: Vec<Model>,
}

fn model_object(id: &str) -> Model {
    // No creation date is known; the process start is as good as any.
    static STARTED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let created = *STARTED.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    Model {
        id: id.to_owned(),
        object: "model",
        created,
        owned_by: "chatq",
    }
}

/// `GET /v1/models`.
#[utoipa::path(
    get,
    path = "/v1/models",
    operation_id = "listModels",
    tag = "openai",
    summary = "List models (OpenAI-compatible)",
    description = "The models configured with `CHATQ_MODELS` (or the default model), in OpenAI's list shape. Errors use OpenAI's shape, except a 503 of load shedding, which has the API's.",
    responses(
        (status = 200, description = "The models.", body = ModelList),
        (status = 401, response = crate::openapi::OpenAiUnauthorized),
        (status = 503, response = crate::openapi::OpenAiOrApiUnavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn models(State(state): State<AppState>, tenant: Result<Tenant, ApiError>) -> Answer {
    tenant?;
    let data = offered(&state).iter().map(|m| model_object(m)).collect();
    Ok(Json(ModelList {
        object: "list",
        data,
    })
    .into_response())
}

/// `GET /v1/models/{id}` (ids may contain `/`).
#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    operation_id = "retrieveModel",
    tag = "openai",
    summary = "Get a model (OpenAI-compatible)",
    description = "Errors use OpenAI's shape, except a 503 of load shedding, which has the API's.",
    params(("id" = String, Path, min_length = 1, description = "The model's name (it may contain `/`).")),
    responses(
        (status = 200, description = "The model.", body = Model),
        (status = 401, response = crate::openapi::OpenAiUnauthorized),
        (status = 404, response = crate::openapi::OpenAiNotFound),
        (status = 503, response = crate::openapi::OpenAiOrApiUnavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn model(
    State(state): State<AppState>,
    tenant: Result<Tenant, ApiError>,
    Path(id): Path<String>,
) -> Answer {
    tenant?;
    if offered(&state).contains(&id) {
        Ok(Json(model_object(&id)).into_response())
    } else {
        Err(OpenAiError::model_not_found(&id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_that_repeats_the_sent_text_continues_seamlessly() {
        let mut t = TextGuard::default();
        assert_eq!(t.accept("Hello, wo").as_deref(), Some("Hello, wo"));
        t.reset();
        assert_eq!(t.accept("Hel").as_deref(), Some(""));
        assert_eq!(t.accept("lo, world").as_deref(), Some("rld"));
        assert_eq!(t.accept("!").as_deref(), Some("!"));
        assert_eq!(t.sent, "Hello, world!");
    }

    #[test]
    fn a_retry_that_says_something_else_is_refused() {
        let mut t = TextGuard::default();
        t.accept("Hello");
        t.reset();
        assert_eq!(t.accept("Help"), None);
    }

    #[test]
    fn multi_byte_text_is_compared_by_bytes_and_cut_on_boundaries() {
        let mut t = TextGuard::default();
        t.accept("héllo 世");
        t.reset();
        assert_eq!(t.accept("héllo 世界").as_deref(), Some("界"));
    }
}
