//! Checks shared by the request validators for input PostgreSQL cannot
//! store: `text` and `jsonb` reject U+0000, which JSON can carry as
//! `\u0000`. Rejecting it here makes it a 400 naming the field instead of a
//! failed insert (a 500, and a batch of submissions retried one by one).

use serde_json::Value;

use crate::error::{ApiError, ApiResult};

/// Rejects a string field containing U+0000.
pub fn no_nul(field: &str, value: &str) -> ApiResult<()> {
    if value.contains('\0') {
        return Err(nul_error(field));
    }
    Ok(())
}

/// Rejects a JSON value with U+0000 in any string or object key, at any
/// depth; the error names the path (`metadata.a.b[2]`). Depth is bounded by
/// serde_json's recursion limit on the way in.
pub fn json_without_nul(field: &str, value: &Value) -> ApiResult<()> {
    match find_nul(value) {
        None => Ok(()),
        Some(NulAt {
            path,
            in_key: false,
        }) => Err(nul_error(&format!("{field}{path}"))),
        // The key itself is not echoed: it is what cannot be shown.
        Some(NulAt { path, in_key: true }) => Err(ApiError::invalid(format!(
            "{field}{path}: object keys must not contain U+0000"
        ))),
    }
}

/// Where a U+0000 is, relative to the value searched.
struct NulAt {
    /// `.key` and `[index]` steps to the string, or to the object whose key has it.
    path: String,
    /// Whether it is in an object key rather than a string value.
    in_key: bool,
}

/// The first U+0000 in `value`; the path is only built on the way back
/// from a find, so clean input allocates nothing.
fn find_nul(value: &Value) -> Option<NulAt> {
    let prefixed = |step: String, mut found: NulAt| {
        found.path.insert_str(0, &step);
        found
    };
    match value {
        Value::String(s) => s.contains('\0').then(|| NulAt {
            path: String::new(),
            in_key: false,
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_nul(item).map(|found| prefixed(format!("[{i}]"), found))),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                return Some(NulAt {
                    path: String::new(),
                    in_key: true,
                });
            }
            find_nul(item).map(|found| prefixed(format!(".{key}"), found))
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => None,
    }
}

fn nul_error(field: &str) -> ApiError {
    ApiError::invalid(format!("{field}: must not contain U+0000"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn message(result: ApiResult<()>) -> String {
        match result {
            Err(ApiError::InvalidRequest(m)) => m,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn strings_without_nul_pass_and_with_nul_name_the_field() {
        assert!(no_nul("content", "hello \u{1} world").is_ok());
        assert_eq!(
            message(no_nul("content", "a\0b")),
            "content: must not contain U+0000"
        );
    }

    #[test]
    fn json_paths_name_nested_values_array_elements_and_keys() {
        assert!(json_without_nul("metadata", &json!({"a": [1, "x", {"b": null}]})).is_ok());
        assert_eq!(
            message(json_without_nul(
                "metadata",
                &json!({"a": {"b": [1, 2, "x\u{0}"]}})
            )),
            "metadata.a.b[2]: must not contain U+0000"
        );
        assert_eq!(
            message(json_without_nul(
                "metadata",
                &json!({"tags": ["ok", "\u{0}"]})
            )),
            "metadata.tags[1]: must not contain U+0000"
        );
        assert_eq!(
            message(json_without_nul("metadata", &json!({"a": {"k\u{0}": 1}}))),
            "metadata.a: object keys must not contain U+0000"
        );
        assert_eq!(
            message(json_without_nul("metadata", &json!({"\u{0}": 1}))),
            "metadata: object keys must not contain U+0000"
        );
    }
}
