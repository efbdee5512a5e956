//! Request parsing, the deterministic reply and OpenAI-shaped JSON bodies.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Model echoed back when the request does not name one.
const DEFAULT_MODEL: &str = "gpt-4o-mini";

/// Vocabulary of `[mock:words=N]` replies: mostly ASCII, with multi-byte
/// words (2, 3 and 4 bytes per character) so that streaming clients that
/// split or re-join text on byte boundaries are caught.
const VOCABULARY: [&str; 13] = [
    "alpha",
    "héllo",
    "bravo",
    "世界",
    "charlie",
    "🌍",
    "delta",
    "naïve",
    "echo",
    "Ωmega",
    "foxtrot",
    "日本語",
    "golf",
];
/// A `[mock:words=N]` reply breaks its line after this many words, so the
/// text also carries newlines.
const WORDS_PER_LINE: usize = 12;

/// The fields of an OpenAI chat completion request that the mock uses.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    pub(crate) messages: Vec<Message>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

/// One chat message; `content` may be a string, null or an array of parts.
#[derive(Debug, Deserialize)]
pub(crate) struct Message {
    role: String,
    #[serde(default)]
    content: Option<Value>,
}

/// `stream_options` of a streaming request.
#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

impl Message {
    /// Text of the message: a string content, the concatenated `text` of content parts, or "".
    fn text(&self) -> String {
        match &self.content {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
            _ => String::new(),
        }
    }
}

impl ChatRequest {
    /// Model name to echo back.
    pub(crate) fn model(&self) -> &str {
        self.model.as_deref().unwrap_or(DEFAULT_MODEL)
    }

    /// Whether the client asked for a server-sent-event stream.
    pub(crate) fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether a final usage chunk was requested in streaming mode.
    pub(crate) fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// The completion budget the mock applies: `max_tokens`, else
    /// `max_completion_tokens`.
    pub(crate) fn completion_limit(&self) -> Option<u64> {
        self.max_tokens.or(self.max_completion_tokens)
    }

    /// Text of the last message with role `user` ("" if there is none).
    pub(crate) fn last_user_text(&self) -> String {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(Message::text)
            .unwrap_or_default()
    }
}

/// The computed answer to a successful request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    /// Assistant content (possibly truncated by `max_tokens`).
    pub(crate) content: String,
    /// "stop" or "length".
    pub(crate) finish_reason: &'static str,
    /// ceil(total message chars / 4), at least 1.
    pub(crate) prompt_tokens: u64,
    /// Number of words in `content`.
    pub(crate) completion_tokens: u64,
}

impl Reply {
    /// Builds the deterministic reply for `req`: the default sentence, or
    /// `words` generated words when given.
    ///
    /// A call that will fail mid-stream (`failing_call`) gets a different
    /// text than the calls that succeed, as a real model's retry would: a
    /// client that keeps a failed attempt's text instead of starting over
    /// ends with the wrong text, even if it only kept its length.
    pub(crate) fn build(req: &ChatRequest, words: Option<usize>, failing_call: bool) -> Self {
        let mut hasher = Sha256::new();
        if failing_call {
            hasher.update(b"failing call");
        }
        let mut total_chars: u64 = 0;
        for m in &req.messages {
            let text = m.text();
            hasher.update(m.role.as_bytes());
            hasher.update(text.as_bytes());
            total_chars += text.chars().count() as u64;
        }
        let digest = hex::encode(hasher.finalize());
        let last_user = req.last_user_text();
        let snippet: String = last_user.chars().take(60).collect();
        let full = match words {
            Some(n) => generated_words(n, &digest),
            None => format!(
                "mock reply {} to \"{}\" after {} messages",
                &digest[..8],
                snippet,
                req.messages.len()
            ),
        };
        let pieces = split_pieces(&full);
        let (content, finish_reason) = match req.completion_limit() {
            Some(limit) if limit < pieces.len() as u64 => {
                let kept: String = pieces.iter().take(limit as usize).copied().collect();
                (kept.trim_end().to_owned(), "length")
            }
            _ => (full.clone(), "stop"),
        };
        let completion_tokens = split_pieces(&content).len() as u64;
        Self {
            content,
            finish_reason,
            prompt_tokens: total_chars.div_ceil(4).max(1),
            completion_tokens,
        }
    }

    /// OpenAI `usage` object.
    pub(crate) fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// `n` words from [`VOCABULARY`], separated by spaces and a newline after
/// every [`WORDS_PER_LINE`]th word. The order of the words depends on
/// `digest` (so different prompts get different texts); every word carries
/// its position, so a lost or repeated piece shows in a diff.
pub(crate) fn generated_words(n: usize, digest: &str) -> String {
    let seed = usize::from_str_radix(&digest[..digest.len().min(4)], 16).unwrap_or(0);
    // The vocabulary's length is prime, so every stride visits every word.
    let len = VOCABULARY.len();
    let (offset, stride) = (seed % len, 1 + (seed / len) % (len - 1));
    let mut out = String::new();
    for i in 0..n {
        if i > 0 {
            out.push(if i % WORDS_PER_LINE == 0 { '\n' } else { ' ' });
        }
        out.push_str(VOCABULARY[(offset + i * stride) % len]);
        out.push_str(&i.to_string());
    }
    out
}

/// Splits `s` into words each followed by its trailing whitespace, so that the
/// pieces concatenate to `s` exactly (leading whitespace stays with the first piece).
pub(crate) fn split_pieces(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_ws = false;
    let mut seen_word = false;
    for (i, c) in s.char_indices() {
        if c.is_whitespace() {
            in_ws = true;
        } else {
            if in_ws && seen_word {
                out.push(&s[start..i]);
                start = i;
            }
            in_ws = false;
            seen_word = true;
        }
    }
    if seen_word {
        out.push(&s[start..]);
    }
    out
}

/// A fresh `chatcmpl-<hex>` id.
pub(crate) fn completion_id() -> String {
    format!("chatcmpl-{:024x}", fastrand::u128(..) >> 32)
}

/// Current Unix time in seconds.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A non-streaming `chat.completion` object.
pub(crate) fn completion_body(model: &str, reply: &Reply) -> Value {
    json!({
        "id": completion_id(),
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply.content},
            "finish_reason": reply.finish_reason,
        }],
        "usage": reply.usage(),
    })
}

/// An OpenAI error response.
pub(crate) fn error_response(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    message: impl Into<String>,
) -> Response {
    let body = json!({
        "error": {"message": message.into(), "type": kind, "param": null, "code": code}
    });
    (status, Json(body)).into_response()
}

/// A 400 `invalid_request_error` response.
pub(crate) fn invalid_request(message: impl Into<String>) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        None,
        message,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_concatenate_exactly() {
        let s = "a  b\nc d";
        let p = split_pieces(s);
        assert_eq!(p, vec!["a  ", "b\n", "c ", "d"]);
        assert_eq!(p.concat(), s);
        assert!(split_pieces("").is_empty());
    }

    #[test]
    fn generated_words_are_deterministic_numbered_and_multi_byte() {
        let text = generated_words(40, "00ff");
        assert_eq!(text, generated_words(40, "00ff"));
        assert_ne!(text, generated_words(40, "0100"));
        assert_eq!(split_pieces(&text).len(), 40);
        assert_eq!(split_pieces(&text).concat(), text);
        assert_eq!(text.lines().count(), 4);
        for word in ["héllo", "世界", "🌍"] {
            assert!(text.contains(word), "{word} missing in {text}");
        }
        let words: Vec<&str> = text.split_whitespace().collect();
        assert!(words[0].ends_with('0') && words[39].ends_with("39"));
        assert!(generated_words(0, "00ff").is_empty());
        assert_eq!(
            generated_words(5_000, "abcd").split_whitespace().count(),
            5_000
        );
    }
}
