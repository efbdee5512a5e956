//! An incremental parser for OpenAI's streamed chat completions
//! (`text/event-stream` of `chat.completion.chunk` objects).
//!
//! Bytes arrive in arbitrary pieces: an event may be split across TCP
//! reads, and so may a multi-byte UTF-8 character. The parser keeps the
//! unfinished line as bytes and decodes only whole lines (a line break is
//! ASCII, so it never falls inside a character). Each line is bounded, and
//! so is everything buffered.

use serde::Deserialize;

/// Longest line accepted from the stream, in bytes.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// What one `data:` event of the stream said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// More reply text (never empty).
    Delta(String),
    /// Why generation stopped.
    Finish(String),
    /// Token counts (`stream_options.include_usage`), as sent.
    Usage {
        /// Prompt tokens.
        prompt_tokens: Option<serde_json::Value>,
        /// Completion tokens.
        completion_tokens: Option<serde_json::Value>,
    },
    /// `data: [DONE]`: the stream is complete.
    Done,
    /// An error object sent mid-stream, with its message.
    Error(String),
}

/// Why the stream could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A line longer than [`MAX_LINE_BYTES`].
    #[error("a stream line is longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    /// A line that is not UTF-8.
    #[error("the stream is not valid UTF-8")]
    NotUtf8,
    /// A `data:` payload that is neither `[DONE]` nor a chunk object.
    #[error("a stream event is not a chat completion chunk")]
    NotAChunk,
}

/// Feeds bytes in with [`ChunkParser::push`], takes events out.
#[derive(Debug, Default)]
pub struct ChunkParser {
    /// The unfinished line.
    line: Vec<u8>,
    /// `data:` lines of the event being read.
    data: Vec<String>,
}

impl ChunkParser {
    /// Parses `bytes`, appending every completed event to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<StreamEvent>) -> Result<(), ParseError> {
        let mut rest = bytes;
        while let Some(at) = rest.iter().position(|b| *b == b'\n') {
            if self.line.len() + at > MAX_LINE_BYTES {
                return Err(ParseError::LineTooLong);
            }
            self.line.extend_from_slice(&rest[..at]);
            rest = &rest[at + 1..];
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, out)?;
        }
        if self.line.len() + rest.len() > MAX_LINE_BYTES {
            return Err(ParseError::LineTooLong);
        }
        self.line.extend_from_slice(rest);
        Ok(())
    }

    /// Ends the input: an event not followed by a blank line still counts.
    pub fn finish(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ParseError> {
        let line = std::mem::take(&mut self.line);
        if !line.is_empty() {
            self.line_done(&line, out)?;
        }
        self.dispatch(out)
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<StreamEvent>) -> Result<(), ParseError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return self.dispatch(out);
        }
        let line = std::str::from_utf8(line).map_err(|_| ParseError::NotUtf8)?;
        // Comments (`: keep-alive`) and other fields (`event:`, `id:`) carry no text.
        if let Some(value) = line.strip_prefix("data:") {
            let value = value.strip_prefix(' ').unwrap_or(value);
            self.data.push(value.to_owned());
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ParseError> {
        if self.data.is_empty() {
            return Ok(());
        }
        let payload = std::mem::take(&mut self.data).join("\n");
        parse_payload(payload.trim(), out)
    }
}

/// Interprets one event's data.
fn parse_payload(payload: &str, out: &mut Vec<StreamEvent>) -> Result<(), ParseError> {
    #[derive(Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Vec<Choice>,
        usage: Option<Usage>,
        error: Option<ErrorBody>,
    }
    #[derive(Deserialize)]
    struct Choice {
        delta: Option<Delta>,
        finish_reason: Option<String>,
    }
    #[derive(Deserialize)]
    struct Delta {
        content: Option<String>,
    }
    #[derive(Deserialize)]
    struct Usage {
        prompt_tokens: Option<serde_json::Value>,
        completion_tokens: Option<serde_json::Value>,
    }
    #[derive(Deserialize)]
    struct ErrorBody {
        message: Option<String>,
    }
    if payload == "[DONE]" {
        out.push(StreamEvent::Done);
        return Ok(());
    }
    let chunk: Chunk = serde_json::from_str(payload).map_err(|_| ParseError::NotAChunk)?;
    if let Some(error) = chunk.error {
        out.push(StreamEvent::Error(
            error.message.unwrap_or_else(|| "unknown error".to_owned()),
        ));
        return Ok(());
    }
    if let Some(choice) = chunk.choices.into_iter().next() {
        if let Some(text) = choice.delta.and_then(|d| d.content)
            && !text.is_empty()
        {
            out.push(StreamEvent::Delta(text));
        }
        if let Some(reason) = choice.finish_reason {
            out.push(StreamEvent::Finish(reason));
        }
    }
    if let Some(usage) = chunk.usage {
        out.push(StreamEvent::Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded stream: a role chunk, text with multi-byte characters,
    /// a keep-alive comment, CRLF line ends, finish, usage, `[DONE]`.
    const RECORDED: &str = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        ": keep-alive\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Grüße, \"},\"finish_reason\":null}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"世界 🌍\"},\"finish_reason\":null}]}\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4,\"total_tokens\":9}}\n\n",
        "data: [DONE]\n\n",
    );

    fn expected() -> Vec<StreamEvent> {
        vec![
            StreamEvent::Delta("Grüße, ".into()),
            StreamEvent::Delta("世界 🌍".into()),
            StreamEvent::Finish("stop".into()),
            StreamEvent::Usage {
                prompt_tokens: Some(5.into()),
                completion_tokens: Some(4.into()),
            },
            StreamEvent::Done,
        ]
    }

    fn parse_in_pieces(bytes: &[u8], cuts: &[usize]) -> Result<Vec<StreamEvent>, ParseError> {
        let mut parser = ChunkParser::default();
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            parser.push(&bytes[start..cut], &mut out)?;
            start = cut;
        }
        parser.push(&bytes[start..], &mut out)?;
        parser.finish(&mut out)?;
        Ok(out)
    }

    #[test]
    fn a_recorded_stream_split_at_every_byte_boundary_parses_the_same() {
        let bytes = RECORDED.as_bytes();
        for cut in 0..=bytes.len() {
            assert_eq!(
                parse_in_pieces(bytes, &[cut]),
                Ok(expected()),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_recorded_stream_fed_byte_by_byte_parses_the_same() {
        let bytes = RECORDED.as_bytes();
        let cuts: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(parse_in_pieces(bytes, &cuts), Ok(expected()));
    }

    #[test]
    fn random_splits_parse_the_same() {
        // A property test over random cut sets (fixed seed: reproducible).
        let bytes = RECORDED.as_bytes();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2_000 {
            let n = rng.usize(0..12);
            let mut cuts: Vec<usize> = (0..n).map(|_| rng.usize(0..=bytes.len())).collect();
            cuts.sort_unstable();
            assert_eq!(
                parse_in_pieces(bytes, &cuts),
                Ok(expected()),
                "cuts {cuts:?}"
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..2_000 {
            let len = rng.usize(0..200);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            // Make some of them look like events.
            if rng.bool() {
                bytes.splice(0..0, b"data: ".iter().copied());
            }
            let _ = parse_in_pieces(&bytes, &[len / 2]);
        }
    }

    #[test]
    fn an_error_object_mid_stream_is_reported() {
        let text = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"error\":{\"message\":\"overloaded\"}}\n\n";
        assert_eq!(
            parse_in_pieces(text.as_bytes(), &[]),
            Ok(vec![
                StreamEvent::Delta("Hi".into()),
                StreamEvent::Error("overloaded".into())
            ])
        );
    }

    #[test]
    fn a_stream_without_done_ends_with_its_last_event() {
        let text =
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}";
        assert_eq!(
            parse_in_pieces(text.as_bytes(), &[]),
            Ok(vec![
                StreamEvent::Delta("Hi".into()),
                StreamEvent::Finish("stop".into())
            ])
        );
    }

    #[test]
    fn garbage_data_and_overlong_lines_are_errors() {
        assert_eq!(
            parse_in_pieces(b"data: {not json\n\n", &[]),
            Err(ParseError::NotAChunk)
        );
        let long = vec![b'a'; MAX_LINE_BYTES + 1];
        assert_eq!(parse_in_pieces(&long, &[]), Err(ParseError::LineTooLong));
        assert_eq!(
            parse_in_pieces(b"data: \xff\xfe\n\n", &[]),
            Err(ParseError::NotUtf8)
        );
    }
}
