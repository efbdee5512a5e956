//! Hostile input from a security probe: U+0000 where PostgreSQL cannot store
//! it, data after the JSON body, bodies that are not objects, a query string
//! of thousands of names. Each is a `400 invalid_request` whose message
//! names the field in JSON terms; none stores anything or logs an error.

use std::process::Stdio;

use chatq_tests::{ADMIN_TOKEN, Api, EnvOptions, TestEnv, amqp_url, bin_path, read_listen_line};
use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

const JSON: &str = "application/json";

/// One hostile request and what it must be answered.
struct Row {
    method: Method,
    path: String,
    body: Option<Vec<u8>>,
    content_type: &'static str,
    status: u16,
    code: &'static str,
    /// A substring of the error message (the field it names).
    message: &'static str,
    /// An `Idempotency-Key` to send (keyed submissions take their own path).
    idempotency_key: Option<&'static str>,
}

/// A JSON POST that must be a 400 `invalid_request` mentioning `message`.
fn post(path: &str, body: &[u8], message: &'static str) -> Row {
    Row {
        method: Method::POST,
        path: path.to_owned(),
        body: Some(body.to_vec()),
        content_type: JSON,
        status: 400,
        code: "invalid_request",
        message,
        idempotency_key: None,
    }
}

/// A GET that must be a 400 `invalid_request` mentioning `message`.
fn get(path: String, message: &'static str) -> Row {
    Row {
        method: Method::GET,
        path,
        body: None,
        content_type: JSON,
        status: 400,
        code: "invalid_request",
        message,
        idempotency_key: None,
    }
}

/// Counts of every table a request could write to.
async fn row_counts(env: &TestEnv) -> anyhow::Result<Vec<(&'static str, i64)>> {
    let mut counts = Vec::new();
    for (table, sql) in [
        ("tenants", "select count(*) from tenants"),
        ("api_keys", "select count(*) from api_keys"),
        ("conversations", "select count(*) from conversations"),
        ("messages", "select count(*) from messages"),
        ("jobs", "select count(*) from jobs"),
    ] {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(&env.db).await?;
        counts.push((table, n));
    }
    Ok(counts)
}

/// Another `chatq-api` on the environment's database and queues, logging
/// JSON lines at `info` to a pipe this test reads (the harness's api passes
/// its stderr through). The handle yields every line once the process ends.
async fn spawn_logged_api(env: &TestEnv) -> anyhow::Result<(Api, Child, JoinHandle<Vec<String>>)> {
    let mut child = Command::new(bin_path("chatq-api"))
        .env("DATABASE_URL", &env.db_url)
        .env("AMQP_URL", amqp_url())
        .env("CHATQ_QUEUE_PREFIX", &env.prefix)
        .env("CHATQ_API_ADDR", "127.0.0.1:0")
        .env("CHATQ_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("CHATQ_DB_MAX_CONNECTIONS", "3")
        .env("RUST_LOG", "info")
        .env("LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("stderr is piped"))?;
    let logs = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut all = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push(line);
        }
        all
    });
    let url = read_listen_line(&mut child, "chatq-api (logged)").await?;
    let api = Api::new(url);
    api.wait_ready().await?;
    Ok((api, child, logs))
}

/// 16,000 distinct three-character names: 63,999 bytes of query string.
fn sixteen_thousand_names() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let n = ALPHABET.len();
    (0..16_000)
        .map(|i| {
            let name = [
                ALPHABET[i / (n * n)],
                ALPHABET[(i / n) % n],
                ALPHABET[i % n],
            ];
            String::from_utf8_lossy(&name).into_owned()
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[tokio::test]
async fn hostile_input_is_a_400_naming_the_field_and_stores_and_logs_nothing() -> anyhow::Result<()>
{
    // Arrange: a deployment, a conversation to post to, an api whose logs we read.
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let conv = env
        .api
        .create_conversation(&key, &serde_json::json!({}))
        .await?;
    let messages = format!("/v1/conversations/{conv}/messages");
    let (api, mut api_proc, logs) = spawn_logged_api(&env).await?;
    let before = row_counts(&env).await?;

    let chat = "/v1/chat";
    let convs = "/v1/conversations";
    let keys = "/admin/v1/api-keys";
    let mut rows = vec![
        // U+0000 (JSON `\u0000`) in every stored string, on each route.
        post(chat, br#"{"content": "a\u0000b"}"#, "content: must not"),
        post(
            chat,
            br#"{"content": "x", "system_prompt": "\u0000"}"#,
            "system_prompt: must not",
        ),
        post(
            chat,
            br#"{"content": "x", "model": "gpt\u0000"}"#,
            "model: must not",
        ),
        post(
            chat,
            br#"{"content": "x", "metadata": {"a\u0000": 1}}"#,
            "metadata: object keys",
        ),
        post(
            chat,
            br#"{"content": "x", "metadata": {"a": {"b": [1, 2, "\u0000"]}}}"#,
            "metadata.a.b[2]: must not",
        ),
        post(
            chat,
            br#"{"content": "x", "metadata": {"tags": ["ok", "x\u0000y"]}}"#,
            "metadata.tags[1]: must not",
        ),
        post(
            convs,
            br#"{"system_prompt": "be \u0000 nice"}"#,
            "system_prompt: must not",
        ),
        post(convs, br#"{"model": "\u0000"}"#, "model: must not"),
        post(
            convs,
            br#"{"metadata": {"\u0000": "v"}}"#,
            "metadata: object keys",
        ),
        post(
            convs,
            br#"{"metadata": {"a": {"b\u0000c": true}}}"#,
            "metadata.a: object keys",
        ),
        post(
            convs,
            br#"{"metadata": {"a": {"b": "\u0000"}}}"#,
            "metadata.a.b: must not",
        ),
        post(
            convs,
            br#"{"metadata": {"list": [[{"k": "\u0000"}]]}}"#,
            "metadata.list[0][0].k: must not",
        ),
        post(&messages, br#"{"content": "\u0000"}"#, "content: must not"),
        post(
            &messages,
            br#"{"content": "x", "model": "m\u0000"}"#,
            "model: must not",
        ),
        post(keys, br#"{"tenant": "evil\u0000corp"}"#, "tenant: must not"),
        // A lone surrogate is not a character: serde_json refuses it.
        post(chat, br#"{"content": "\ud800"}"#, "content: "),
        post(&messages, br#"{"content": "x\udfff"}"#, "content: "),
        // Data after the body.
        post(chat, br#"{"content": "x"} GARBAGE"#, "trailing characters"),
        post(
            &messages,
            br#"{"content": "x"}{"content": "y"}"#,
            "trailing characters",
        ),
        post(convs, br#"{} []"#, "trailing characters"),
        post(keys, br#"{"tenant": "t"} x"#, "trailing characters"),
        // Bodies that are not objects.
        post(
            chat,
            br#"["x", null, null, null, null, null]"#,
            "must be a JSON object",
        ),
        post(&messages, br#"["x"]"#, "must be a JSON object"),
        post(convs, br#"[]"#, "must be a JSON object"),
        post(keys, br#"["t"]"#, "must be a JSON object"),
        post(chat, br#""x""#, "must be a JSON object"),
        post(&messages, b"42", "must be a JSON object"),
        post(convs, b"3.5", "must be a JSON object"),
        post(chat, b"null", "must be a JSON object"),
        // Wrong types are described in JSON terms, naming the field.
        post(
            chat,
            br#"{"content": "x", "max_tokens": 1.5}"#,
            "max_tokens: invalid type: number `1.5`, expected an integer",
        ),
        post(
            chat,
            br#"{"content": "x", "temperature": "hot"}"#,
            "temperature: invalid type: string \"hot\", expected a number",
        ),
        post(
            &messages,
            br#"{"content": {}}"#,
            "content: invalid type: object, expected a string",
        ),
        post(
            keys,
            br#"{"tenant": "t", "rate_limit_per_minute": [1]}"#,
            "rate_limit_per_minute: invalid type: array, expected an integer",
        ),
        // Query strings: thousands of names, a name given twice.
        get(
            format!("{convs}?{}", sixteen_thousand_names()),
            "too many query parameters",
        ),
        get(
            format!("{convs}?limit=1&limit=2"),
            "limit: given more than once",
        ),
        get(
            format!("{messages}?limit=1&limit=2"),
            "limit: given more than once",
        ),
    ];
    // NUL again, with an Idempotency-Key: keyed submissions are stored by
    // their own statement, not the batcher.
    for path in [chat, messages.as_str()] {
        rows.push(Row {
            idempotency_key: Some("hostile-input-probe"),
            ..post(
                path,
                br#"{"content": "\u0000"}"#,
                "content: must not contain U+0000",
            )
        });
    }

    // Act and assert, row by row.
    let rust_words = [
        "struct",
        "Body",
        "CreateKey",
        "CreateConversation",
        "i64",
        "f64",
        "String",
        "Option",
        "serde",
        "a map",
        "sequence",
        "floating point",
    ];
    // Every row is sent and checked; the failures are reported together.
    let mut failures = Vec::new();
    for row in rows {
        let token = if row.path.starts_with("/admin/") {
            ADMIN_TOKEN
        } else {
            key.as_str()
        };
        let body = row.body.as_deref().map(String::from_utf8_lossy);
        let what = format!(
            "{} {} {}",
            row.method,
            row.path.chars().take(60).collect::<String>(),
            body.unwrap_or_default()
                .chars()
                .take(80)
                .collect::<String>()
        );
        let r = api
            .raw(
                row.method,
                &row.path,
                Some(token),
                row.body.map(|b| (row.content_type, b)),
                &row.idempotency_key
                    .map(|k| vec![("idempotency-key", k)])
                    .unwrap_or_default(),
            )
            .await?;
        let message = r.body["error"]["message"].as_str().unwrap_or_default();
        if (r.status, r.error_code()) != (row.status, row.code) {
            failures.push(format!(
                "{what}: answered {} {}, expected {} {}",
                r.status, r.body, row.status, row.code
            ));
        } else if !message.contains(row.message) {
            failures.push(format!("{what}: {message:?} lacks {:?}", row.message));
        } else if let Some(word) = rust_words.iter().find(|w| message.contains(**w)) {
            failures.push(format!("{what}: {message:?} mentions {word:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Nothing was stored.
    assert_eq!(
        row_counts(&env).await?,
        before,
        "hostile input stored nothing"
    );

    // Nothing was logged as an error, and nothing above debug inside a request.
    api_proc.kill().await?;
    let lines = logs.await?;
    assert!(!lines.is_empty(), "the logged api wrote its start-up lines");
    for line in &lines {
        let log: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        let level = log["level"].as_str().unwrap_or_default();
        assert_ne!(level, "ERROR", "the api logged an error: {line}");
        assert!(
            log["span"]["name"] != "request" || level == "DEBUG" || level == "TRACE",
            "a hostile request was logged above debug: {line}"
        );
    }
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn json_numbers_at_the_edges_of_a_double_are_stored_and_read_back_unchanged()
-> anyhow::Result<()> {
    // Found by schemathesis: PostgreSQL prints a stored 1.79e308 with all its
    // 309 digits, which an approximate float parser reads as out of range.
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let metadata = serde_json::json!({
        "max": f64::MAX, "min": f64::MIN, "tiny": 5e-324, "third": 1.0 / 3.0,
        "u64": u64::MAX, "i64": i64::MIN, "nested": [[1.7976931348623157e308]],
    });
    let created = env
        .api
        .post(
            "/v1/conversations",
            &key,
            &serde_json::json!({ "metadata": metadata }),
        )
        .await?;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["metadata"], metadata);
    let id = created.str("id");
    let read = env
        .api
        .get(&format!("/v1/conversations/{id}"), &key)
        .await?;
    assert_eq!((read.status, &read.body["metadata"]), (200, &metadata));
    let listed = env.api.get("/v1/conversations", &key).await?;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.body["data"][0]["metadata"], metadata);
    env.cleanup().await;
    Ok(())
}
