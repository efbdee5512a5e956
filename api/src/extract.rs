//! Extractors that keep every malformed input inside the API's error body:
//! JSON bodies (415, 413, 400 naming the field), path ids (400 for a bad
//! UUID) and query strings (400 for unknown or malformed parameters).

use std::collections::HashSet;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::error::ApiError;
use crate::{ApiConfig, AppState};

/// A JSON body, parsed strictly (unknown fields are rejected by the types).
pub struct JsonBody<T>(pub T);

/// A JSON body that may also be absent (an empty body reads as `{}`).
pub struct OptionalJsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_json_bytes(req, false, &state.config).await?;
        parse(&bytes).map(Self)
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_json_bytes(req, true, &state.config).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return parse(b"{}").map(Self);
        }
        parse(&bytes).map(Self)
    }
}

/// Past the body limit, up to this many bytes of a body without a declared
/// length (chunked) are still read (and thrown away) so the client can finish
/// sending and read our 413; a client that sends more gets the connection
/// closed instead.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

/// The body, within `CHATQ_MAX_BODY_BYTES` and `CHATQ_BODY_READ_TIMEOUT_SECS`.
async fn read_json_bytes(
    req: Request,
    allow_empty: bool,
    config: &ApiConfig,
) -> Result<Bytes, ApiError> {
    let limit = config.max_body_bytes;
    let (parts, body) = req.into_parts();
    let declared_len = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Refused before any of the body is read: waiting for a declared
    // terabyte (or for a client that declares it and sends nothing) would
    // hold the connection. The 413 closes the connection; the server lingers
    // so the client can still read it (server.rs).
    if declared_len.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let buf = read_at_most(body, limit, config.body_read_timeout).await?;
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

/// Reads `body` if it is at most `limit` bytes, else drains up to
/// [`DRAIN_LIMIT`] and answers 413. The whole body must arrive within
/// `deadline`: a client sending slowly, or not at all, gets a 400.
async fn read_at_most(body: Body, limit: usize, deadline: Duration) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    let timer = tokio::time::sleep(deadline);
    let mut timer = std::pin::pin!(timer);
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            () = &mut timer => {
                // Already past the limit: the 413 says more.
                if seen > limit {
                    break;
                }
                return Err(ApiError::BodyTimeout(deadline.as_secs()));
            }
        };
        let Some(chunk) = next else {
            break;
        };
        let chunk = chunk
            .map_err(|err| ApiError::invalid(format!("could not read the request body: {err}")))?;
        seen = seen.saturating_add(chunk.len());
        if seen > limit {
            if seen > DRAIN_LIMIT {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&chunk);
    }
    if seen > limit {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    Ok(buf)
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

/// Parses a JSON object body, naming the offending field in the error and
/// describing what was expected in JSON terms (never a Rust type).
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would read an array into a struct field by field (and a string
    // or number fails with the struct's Rust name): every body is an object.
    if bytes.iter().find(|b| !is_json_whitespace(**b)) != Some(&b'{') {
        return Err(ApiError::invalid("request body must be a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|err| {
        let mut path = err.path().to_string();
        // `?` stands for a key not read yet: the body ended or broke where
        // a key was due. Name the object it was in, if any.
        while let Some(outer) = path.strip_suffix(".?") {
            path.truncate(outer.len());
        }
        let message = in_json_terms(err.inner());
        if path.is_empty() || path == "." || path == "?" {
            ApiError::invalid(format!("invalid JSON body: {message}"))
        } else {
            ApiError::invalid(format!("{path}: {message}"))
        }
    })?;
    // Without this, `{"content":"x"} GARBAGE` would be accepted.
    de.end()
        .map_err(|err| ApiError::invalid(format!("invalid JSON body: {err}")))?;
    Ok(value)
}

/// Whitespace as JSON defines it (RFC 8259), narrower than ASCII's.
fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// serde's message with its Rust vocabulary (`expected struct ChatBody`,
/// `expected i64`, `floating point`, `map`) put in JSON's. Only serde's own
/// wording is rewritten: client data sits inside quotes or backticks, before
/// the last `, expected `.
fn in_json_terms(err: &serde_json::Error) -> String {
    let full = err.to_string();
    let position = format!(" at line {} column {}", err.line(), err.column());
    let (message, position) = match full.strip_suffix(position.as_str()) {
        Some(message) => (message, position.as_str()),
        None => (full.as_str(), ""),
    };
    let Some((found, expected)) = message.rsplit_once(", expected ") else {
        return full;
    };
    let found = found_in_json_terms(found);
    let expected = expected_in_json_terms(expected, found.starts_with("invalid value: "));
    format!("{found}, expected {expected}{position}")
}

/// `invalid type: floating point `1.5`` → `invalid type: number `1.5``.
fn found_in_json_terms(found: &str) -> String {
    const KINDS: [(&str, &str); 4] = [
        ("floating point", "number"),
        ("map", "object"),
        ("sequence", "array"),
        ("unit value", "null"),
    ];
    for lead in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = found.strip_prefix(lead) {
            for (rust, json) in KINDS {
                if let Some(tail) = rest.strip_prefix(rust) {
                    return format!("{lead}{json}{tail}");
                }
            }
        }
    }
    found.to_owned()
}

/// `struct ChatBody` → `an object`, `i64` → `an integer`, and so on;
/// anything else (`a string`, `one of `content`, `model``) is kept.
fn expected_in_json_terms(expected: &str, out_of_range: bool) -> String {
    let integer = |min: i128, max: u128| {
        if out_of_range {
            format!("an integer from {min} to {max}")
        } else {
            "an integer".to_owned()
        }
    };
    match expected {
        "i8" => integer(i8::MIN.into(), i8::MAX.unsigned_abs().into()),
        "i16" => integer(i16::MIN.into(), i16::MAX.unsigned_abs().into()),
        "i32" => integer(i32::MIN.into(), i32::MAX.unsigned_abs().into()),
        "i64" => integer(i64::MIN.into(), i64::MAX.unsigned_abs().into()),
        "u8" => integer(0, u8::MAX.into()),
        "u16" => integer(0, u16::MAX.into()),
        "u32" => integer(0, u32::MAX.into()),
        "u64" => integer(0, u64::MAX.into()),
        "f32" | "f64" => "a number".to_owned(),
        "a borrowed string" => "a string".to_owned(),
        "unit" => "null".to_owned(),
        e if e.starts_with("struct ") || e.starts_with("a map") => "an object".to_owned(),
        e if e.starts_with("a sequence") || e.starts_with("tuple") || e.starts_with("a tuple") => {
            "an array".to_owned()
        }
        e if e.starts_with("enum ") => "one of the documented values".to_owned(),
        other => other.to_owned(),
    }
}

/// The `{id}` of a route, which must be a UUID.
pub struct IdPath(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::invalid("invalid path parameter"))?;
        // A completion id of the OpenAI facade names its job too.
        let id = raw.strip_prefix("chatcmpl-").unwrap_or(&raw);
        Uuid::parse_str(id)
            .map(Self)
            .map_err(|_| ApiError::invalid(format!("id: `{raw}` is not a UUID")))
    }
}

/// Most parameters a query string may carry: every route takes two at most.
pub const MAX_QUERY_PARAMS: usize = 16;

/// The query string as name/value pairs, each name allowed once, at most
/// [`MAX_QUERY_PARAMS`] of them.
pub struct QueryParams(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        // Counted first, in one pass over the raw bytes, so a hostile query
        // (thousands of names) costs next to nothing. Empty pieces (`a&&b`)
        // are skipped by the decoder too, so they do not count.
        if query.split('&').filter(|p| !p.is_empty()).count() > MAX_QUERY_PARAMS {
            return Err(ApiError::invalid(format!(
                "too many query parameters (at most {MAX_QUERY_PARAMS})"
            )));
        }
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|_| ApiError::invalid("malformed query string"))?;
        let mut seen = HashSet::with_capacity(pairs.len());
        if let Some((name, _)) = pairs.iter().find(|(n, _)| !seen.insert(n.as_str())) {
            return Err(ApiError::invalid(format!("{name}: given more than once")));
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

/// The query of a list: `?limit=&after=`. Any other parameter, a value out
/// of range or not a UUID is a 400 naming it (read by [`QueryParams`]).
#[derive(Debug, Clone, Copy, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1 to 100 (default 20); anything else is a 400, not clamped.
    #[param(required = false, minimum = 1, maximum = 100, default = 20)]
    pub limit: i64,
    /// Continue after this item: the previous page's `next_after`.
    #[param(required = false, value_type = Uuid)]
    pub after: Option<Uuid>,
}

impl<S: Send + Sync> FromRequestParts<S> for PageQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let (limit, after) = QueryParams::from_request_parts(parts, state)
            .await?
            .page()?;
        Ok(Self { limit, after })
    }
}

/// Longest long-poll of `GET /v1/jobs/{id}?wait=`, in seconds.
pub const MAX_WAIT_SECS: i64 = 60;

/// The query of `GET /v1/jobs/{id}`: `?wait=`. Any other parameter or a
/// value out of range is a 400 naming it (read by [`QueryParams`]).
#[derive(Debug, Clone, Copy, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Seconds to wait for the job to be terminal, 0 to 60 (default 0: answer at once).
    #[param(required = false, minimum = 0, maximum = 60, default = 0)]
    pub wait: i64,
}

impl<S: Send + Sync> FromRequestParts<S> for WaitQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let q = QueryParams::from_request_parts(parts, state).await?;
        q.only(&["wait"])?;
        Ok(Self {
            wait: q.int("wait", 0, MAX_WAIT_SECS, 0)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    /// Shaped like the API's bodies: strict, optional fields of each kind.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code, reason = "only parsed")]
    struct Body {
        content: String,
        max_tokens: Option<i64>,
        temperature: Option<f64>,
        stream: Option<bool>,
        metadata: Option<serde_json::Value>,
    }

    fn message(bytes: &[u8]) -> String {
        match parse::<Body>(bytes) {
            Err(ApiError::InvalidRequest(m)) => m,
            other => panic!("expected a 400 for {bytes:?}, got {other:?}"),
        }
    }

    #[test]
    fn a_body_that_is_not_an_object_is_refused_in_json_terms() {
        for body in [
            &b"[\"x\"]"[..],
            b"\"x\"",
            b"5",
            b"null",
            b"true",
            b"",
            b" \n\t",
        ] {
            assert_eq!(
                message(body),
                "request body must be a JSON object",
                "{body:?}"
            );
        }
        assert!(parse::<Body>(b" \r\n {\"content\": \"x\"} \n").is_ok());
    }

    #[test]
    fn trailing_data_after_the_object_is_refused() {
        let m = message(br#"{"content":"x"} GARBAGE"#);
        assert!(
            m.starts_with("invalid JSON body: trailing characters"),
            "{m}"
        );
        let m = message(br#"{"content":"x"}{"content":"y"}"#);
        assert!(
            m.starts_with("invalid JSON body: trailing characters"),
            "{m}"
        );
    }

    #[test]
    fn type_errors_name_the_field_and_the_json_type_expected() {
        let cases: [(&[u8], &str); 8] = [
            (
                br#"{"content": 5}"#,
                "content: invalid type: integer `5`, expected a string",
            ),
            (
                br#"{"content": {}}"#,
                "content: invalid type: object, expected a string",
            ),
            (
                br#"{"content": []}"#,
                "content: invalid type: array, expected a string",
            ),
            (
                br#"{"content": null}"#,
                "content: invalid type: null, expected a string",
            ),
            (
                br#"{"content": "x", "max_tokens": 1.5}"#,
                "max_tokens: invalid type: number `1.5`, expected an integer",
            ),
            (
                br#"{"content": "x", "max_tokens": 10000000000000000000}"#,
                "max_tokens: invalid value: integer `10000000000000000000`, expected an integer from -9223372036854775808 to 9223372036854775807",
            ),
            (
                br#"{"content": "x", "temperature": "hot"}"#,
                "temperature: invalid type: string \"hot\", expected a number",
            ),
            (
                br#"{"content": "x", "stream": 1}"#,
                "stream: invalid type: integer `1`, expected a boolean",
            ),
        ];
        for (body, want) in cases {
            let m = message(body);
            assert!(m.starts_with(want), "{m:?} should start with {want:?}");
            assert!(
                !m.contains("struct") && !m.contains("i64") && !m.contains("f64"),
                "{m}"
            );
        }
    }

    #[test]
    fn missing_and_unknown_fields_are_named() {
        let m = message(b"{}");
        assert!(
            m.starts_with("invalid JSON body: missing field `content`"),
            "{m}"
        );
        for cut in [&b"{"[..], br#"{"content": "x", "#] {
            let m = message(cut);
            assert!(m.starts_with("invalid JSON body: EOF"), "{m}");
        }
        let m = message(br#"{"content": "x", "metadata": {"a": 1,"#);
        assert!(m.starts_with("metadata: EOF"), "{m}");
        let m = message(br#"{"content": "x", "bogus": 1}"#);
        assert!(m.contains("unknown field `bogus`"), "{m}");
        assert!(
            m.contains("`content`") && m.contains("`metadata`"),
            "lists accepted: {m}"
        );
    }

    #[test]
    fn a_lone_surrogate_or_raw_control_character_is_a_400() {
        let m = message(br#"{"content": "\ud800"}"#);
        assert!(m.starts_with("content: "), "{m}");
        let m = message(b"{\"content\": \"a\0b\"}");
        assert!(m.starts_with("content: "), "{m}");
        // An escaped NUL is valid JSON; the validators refuse it (validate.rs).
        assert!(parse::<Body>(br#"{"content": "a\u0000b"}"#).is_ok());
    }

    #[test]
    fn client_data_that_looks_like_rust_wording_is_left_alone() {
        let m = message(br#"{"content": "x", "temperature": "map, expected i64"}"#);
        assert!(
            m.starts_with(
                r#"temperature: invalid type: string "map, expected i64", expected a number"#
            ),
            "{m}"
        );
    }

    fn parts(query: &str) -> Parts {
        let (parts, ()) = Request::builder()
            .uri(format!("/v1/conversations?{query}"))
            .body(())
            .expect("a valid test request")
            .into_parts();
        parts
    }

    async fn query_error(query: &str) -> Option<String> {
        match QueryParams::from_request_parts(&mut parts(query), &()).await {
            Ok(_) => None,
            Err(ApiError::InvalidRequest(m)) => Some(m),
            Err(other) => panic!("expected a 400, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn query_parameters_are_bounded_and_unique() {
        assert_eq!(query_error("limit=5&after=x").await, None);
        let sixteen: Vec<String> = (0..MAX_QUERY_PARAMS).map(|i| format!("p{i}=1")).collect();
        assert_eq!(query_error(&sixteen.join("&")).await, None);
        let seventeen = format!("{}&p16=1", sixteen.join("&"));
        assert_eq!(
            query_error(&seventeen).await.as_deref(),
            Some("too many query parameters (at most 16)")
        );
        let many: Vec<String> = (0..10_000).map(|i| format!("{i:x}")).collect();
        assert!(
            query_error(&many.join("&"))
                .await
                .is_some_and(|m| m.starts_with("too many"))
        );
        assert_eq!(
            query_error("limit=1&after=x&limit=2").await.as_deref(),
            Some("limit: given more than once")
        );
        // Empty pieces are not parameters.
        assert_eq!(query_error("&&limit=1&&").await, None);
    }
}
