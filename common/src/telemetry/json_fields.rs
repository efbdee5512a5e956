//! How a span's fields are kept for JSON log lines: written straight into
//! the span's JSON object, and a field recorded later is appended to it.
//!
//! tracing-subscriber's own `JsonFields` collects every field into a map of
//! `serde_json::Value`s and serializes the map, and to record one more
//! field it parses the span's JSON back into a map and writes it out
//! again. A request span is made on every request and the worker records
//! three fields on every job's span after its claim, so that was most of
//! what a span cost at `LOG_FORMAT=json`. The lines are the same: the JSON
//! event formatter parses these fields into an object when it writes a
//! line, as it did before (a field recorded twice is kept twice in the
//! stored text; the parse keeps the last, as a map would).

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::Writer;

/// Span fields as one JSON object (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonSpanFields;

impl<'writer> FormatFields<'writer> for JsonSpanFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        writer.write_char('{')?;
        let mut v = Visitor::new(&mut writer, true);
        fields.record(&mut v);
        v.finish()?;
        writer.write_char('}')
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        if current.fields.is_empty() {
            return self.format_fields(current.as_writer(), fields);
        }
        // Reopen the object: `{…}` → `{…,"new":…}`.
        if !current.fields.ends_with('}') {
            return Err(fmt::Error);
        }
        current.fields.pop();
        let first = current.fields == "{";
        let mut v = Visitor::new(&mut current.fields, first);
        fields.record(&mut v);
        let result = v.finish();
        current.fields.push('}');
        result
    }
}

/// Writes `"name":value` pairs, comma-separated.
struct Visitor<'a> {
    out: &'a mut dyn Write,
    first: bool,
    result: fmt::Result,
}

impl<'a> Visitor<'a> {
    fn new(out: &'a mut dyn Write, first: bool) -> Self {
        Self {
            out,
            first,
            result: Ok(()),
        }
    }

    fn key(&mut self, field: &Field) -> fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.out.write_char(',')?;
        }
        let name = field.name();
        string(self.out, name.strip_prefix("r#").unwrap_or(name))?;
        self.out.write_char(':')
    }

    fn pair(&mut self, field: &Field, value: impl FnOnce(&mut dyn Write) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| value(self.out));
        }
    }
}

impl VisitOutput<fmt::Result> for Visitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.pair(field, |out| string(out, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.pair(field, |out| write!(out, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.pair(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.pair(field, |out| write!(out, "{value}"));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.pair(field, |out| write!(out, "{value}"));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.pair(field, |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: those become null, as serde_json does.
        if value.is_finite() {
            self.pair(field, |out| write!(out, "{value:?}"));
        } else {
            self.pair(field, |out| out.write_str("null"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.pair(field, |out| {
            out.write_char('"')?;
            write!(Escaped(out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// `s` as a JSON string.
fn string(out: &mut dyn Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(s)?;
    out.write_char('"')
}

/// Escapes what is written to it for the inside of a JSON string.
struct Escaped<'a>(&'a mut dyn Write);

impl Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // What needs escaping is ASCII, so a byte scan finds it, and the
        // plain runs between are cut at char boundaries.
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..0x20 => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    /// The log lines a JSON subscriber using [`JsonSpanFields`] writes
    /// while `f` runs, parsed.
    fn lines(f: impl FnOnce()) -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                crate::sync::lock(&self.0).extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_span_list(false)
                .fmt_fields(JsonSpanFields)
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(crate::sync::lock(&sink.0).clone()).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or(serde_json::Value::Null))
            .collect()
    }

    #[test]
    fn span_fields_reach_the_line_as_json_values_with_later_records_appended() {
        let tricky = "quote \" backslash \\ newline \n tab \t bell \u{7} é 😀";
        let got = lines(|| {
            let span = tracing::info_span!(
                "job",
                r#type = "chat",
                text = tricky,
                shown = %tricky,
                n = 7_u64,
                neg = -3_i64,
                ok = true,
                ratio = 0.5,
                nan = f64::NAN,
                later = tracing::field::Empty,
                again = tracing::field::Empty,
            );
            span.record("later", 42_u64);
            span.record("again", tracing::field::display("x"));
            let _enter = span.enter();
            tracing::info!("inside");
        });
        assert_eq!(got.len(), 1, "{got:?}");
        let fields = &got[0]["span"];
        assert_eq!(fields["name"], "job");
        assert_eq!(fields["type"], "chat");
        assert_eq!(fields["text"], tricky);
        assert_eq!(fields["shown"], tricky);
        assert_eq!(fields["n"], 7);
        assert_eq!(fields["neg"], -3);
        assert_eq!(fields["ok"], true);
        assert_eq!(fields["ratio"], 0.5);
        assert!(fields["nan"].is_null());
        assert_eq!(fields["later"], 42);
        assert_eq!(fields["again"], "x");
    }

    #[test]
    fn a_span_with_no_fields_until_one_is_recorded_gets_an_object() {
        let got = lines(|| {
            let span = tracing::info_span!("request", trace_id = tracing::field::Empty);
            {
                let _enter = span.enter();
                tracing::info!("before");
            }
            span.record("trace_id", "abc");
            span.record("trace_id", "def");
            let _enter = span.enter();
            tracing::info!("after");
        });
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0]["span"]["name"], "request");
        assert!(got[0]["span"].get("trace_id").is_none());
        // Recorded twice: the last value is the one a line shows.
        assert_eq!(got[1]["span"]["trace_id"], "def");
    }
}
