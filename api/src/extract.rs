//! Extractors that keep every malformed input inside the API's error body:
//! JSON bodies (415, 413, 400 naming the field), path ids (400 for a bad
//! UUID) and query strings (400 for unknown or malformed parameters).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;

/// A JSON body, parsed strictly (unknown fields are rejected by the types).
pub struct JsonBody<T>(pub T);

/// A JSON body that may also be absent (an empty body reads as `{}`).
pub struct OptionalJsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_json_bytes(req, false, state.config.max_body_bytes).await?;
        parse(&bytes).map(Self)
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_json_bytes(req, true, state.config.max_body_bytes).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return parse(b"{}").map(Self);
        }
        parse(&bytes).map(Self)
    }
}

/// Past the body limit, up to this many bytes are still read (and thrown
/// away) so the client can finish sending and read our 413; a client that
/// sends more gets the connection closed instead.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

async fn read_json_bytes(req: Request, allow_empty: bool, limit: usize) -> Result<Bytes, ApiError> {
    let (parts, body) = req.into_parts();
    let declared_len = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut too_large = declared_len.is_some_and(|n| n > limit);
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|err| ApiError::invalid(format!("could not read the request body: {err}")))?;
        seen = seen.saturating_add(chunk.len());
        too_large |= seen > limit;
        if too_large {
            if seen > DRAIN_LIMIT {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&chunk);
    }
    if too_large {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let is_json = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json_content_type);
    let is_empty = buf.iter().all(u8::is_ascii_whitespace);
    if !(is_json || (allow_empty && is_empty)) {
        return Err(ApiError::UnsupportedMediaType);
    }
    Ok(Bytes::from(buf))
}

fn is_json_content_type(value: &str) -> bool {
    let mime = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Parses JSON, naming the offending field in the error.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path.is_empty() || path == "." {
            ApiError::invalid(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::invalid(format!("{path}: {inner}"))
        }
    })
}

/// The `{id}` of a route, which must be a UUID.
pub struct IdPath(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::invalid("invalid path parameter"))?;
        Uuid::parse_str(&raw)
            .map(Self)
            .map_err(|_| ApiError::invalid(format!("id: `{raw}` is not a UUID")))
    }
}

/// The query string as name/value pairs, each name allowed once.
pub struct QueryParams(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(parts.uri.query().unwrap_or_default())
                .map_err(|_| ApiError::invalid("malformed query string"))?;
        for (i, (name, _)) in pairs.iter().enumerate() {
            if pairs[..i].iter().any(|(n, _)| n == name) {
                return Err(ApiError::invalid(format!("{name}: given more than once")));
            }
        }
        Ok(Self(pairs))
    }
}

impl QueryParams {
    /// Rejects any parameter not in `allowed`.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self.0.iter().find(|(n, _)| !allowed.contains(&n.as_str())) {
            Some((name, _)) => Err(ApiError::invalid(format!(
                "{name}: unknown query parameter"
            ))),
            None => Ok(()),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// An integer parameter within `min..=max`, or `default` when absent.
    pub fn int(&self, name: &str, min: i64, max: i64, default: i64) -> Result<i64, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw
                .parse::<i64>()
                .ok()
                .filter(|v| (min..=max).contains(v))
                .ok_or_else(|| {
                    ApiError::invalid(format!("{name}: must be an integer from {min} to {max}"))
                }),
        }
    }

    /// A UUID parameter, if present.
    pub fn uuid(&self, name: &str) -> Result<Option<Uuid>, ApiError> {
        self.get(name)
            .map(|raw| {
                Uuid::parse_str(raw)
                    .map_err(|_| ApiError::invalid(format!("{name}: must be a UUID")))
            })
            .transpose()
    }

    /// The pagination parameters `limit` (1–100, default 20) and `after`.
    pub fn page(&self) -> Result<(i64, Option<Uuid>), ApiError> {
        self.only(&["limit", "after"])?;
        Ok((self.int("limit", 1, 100, 20)?, self.uuid("after")?))
    }
}
