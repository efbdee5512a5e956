//! API.md's error table and validation rules: every bad input gets its
//! status and error code, never a 500, and changes no stored data.

use std::time::Duration;

use chatq_tests::{ADMIN_TOKEN, EnvOptions, TestEnv, eventually, spawn_api};
use reqwest::Method;
use serde_json::json;

/// (method, path, body with content type, expected status, expected code)
type Case<'a> = (Method, String, Option<(&'a str, Vec<u8>)>, u16, &'a str);

async fn row_counts(env: &TestEnv) -> anyhow::Result<(i64, i64, i64)> {
    let c: i64 = sqlx::query_scalar("select count(*) from conversations")
        .fetch_one(&env.db)
        .await?;
    let m: i64 = sqlx::query_scalar("select count(*) from messages")
        .fetch_one(&env.db)
        .await?;
    let j: i64 = sqlx::query_scalar("select count(*) from jobs")
        .fetch_one(&env.db)
        .await?;
    Ok((c, m, j))
}

#[tokio::test]
async fn malformed_input_is_rejected_with_the_documented_status_and_changes_nothing()
-> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let conv = env.api.create_conversation(&key, &json!({})).await?;
    let submit = format!("/v1/conversations/{conv}/messages");
    let before = row_counts(&env).await?;
    let api = &env.api;
    let json_ct = "application/json";

    // (method, path, body, expected status, expected code)
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            submit.clone(),
            Some((json_ct, b"{not json".to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            submit.clone(),
            Some((json_ct, b"[]".to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            submit.clone(),
            Some((json_ct, br#"{"content": 5}"#.to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            submit.clone(),
            Some((json_ct, br#"{"content": null}"#.to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            submit.clone(),
            Some((json_ct, br#"{}"#.to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            submit.clone(),
            Some((json_ct, br#"{"content": ""}"#.to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            submit.clone(),
            Some((json_ct, br#"{"content": "x", "bogus": 1}"#.to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            submit.clone(),
            Some((json_ct, br#"{"content": "x", "max_tokens": 0}"#.to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            submit.clone(),
            Some((
                json_ct,
                br#"{"content": "x", "max_tokens": 32769}"#.to_vec(),
            )),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            submit.clone(),
            Some((json_ct, br#"{"content": "x", "max_tokens": 1.5}"#.to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            submit.clone(),
            Some((json_ct, br#"{"content": "x", "temperature": 2.5}"#.to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            submit.clone(),
            Some((
                json_ct,
                br#"{"content": "x", "temperature": -0.1}"#.to_vec(),
            )),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            submit.clone(),
            Some((json_ct, br#"{"content": "x", "model": ""}"#.to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            submit.clone(),
            Some(("text/plain", br#"{"content": "x"}"#.to_vec())),
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            submit.clone(),
            None,
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            submit.clone(),
            Some((json_ct, vec![b'a'; 300 * 1024])),
            413,
            "payload_too_large",
        ),
        (
            Method::POST,
            "/v1/conversations".into(),
            Some((json_ct, br#"{"metadata": [1]}"#.to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/conversations".into(),
            Some((json_ct, br#"{"extra": true}"#.to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/chat".into(),
            Some((json_ct, br#"{"content": "x", "nope": 1}"#.to_vec())),
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/conversations/not-a-uuid".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/jobs/123".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/conversations?limit=0".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/conversations?limit=-1".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/conversations?limit=101".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/conversations?limit=100000".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/conversations?limit=abc".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/conversations?after=xyz".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/conversations?color=red".into(),
            None,
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            format!("{submit}?limit=0"),
            None,
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            format!("/v1/jobs/{conv}?wait=61"),
            None,
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            format!("/v1/jobs/{conv}?wait=abc"),
            None,
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            format!("/v1/jobs/{conv}?wait=-1"),
            None,
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/nothing-here".into(),
            None,
            404,
            "not_found",
        ),
        (
            Method::GET,
            format!("/v1/conversations/{}", uuid::Uuid::now_v7()),
            None,
            404,
            "not_found",
        ),
        (
            Method::GET,
            format!("/v1/jobs/{}", uuid::Uuid::now_v7()),
            None,
            404,
            "not_found",
        ),
        (
            Method::POST,
            format!("/v1/conversations/{}/messages", uuid::Uuid::now_v7()),
            Some((json_ct, br#"{"content": "x"}"#.to_vec())),
            404,
            "not_found",
        ),
        (
            Method::PUT,
            "/v1/conversations".into(),
            None,
            405,
            "method_not_allowed",
        ),
        (
            Method::DELETE,
            "/v1/chat".into(),
            None,
            405,
            "method_not_allowed",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let r = api
            .raw(method.clone(), &path, Some(&key), body, &[])
            .await?;
        assert_eq!(
            (r.status, r.error_code()),
            (status, code),
            "{method} {path}: {}",
            r.body
        );
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{method} {path} has a message"
        );
    }

    // Too long content, by character count (multi-byte characters count once).
    let long = "é".repeat(100_001);
    let r = api.post(&submit, &key, &json!({"content": long})).await?;
    assert_eq!((r.status, r.error_code()), (400, "invalid_request"));
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("content"),
        "names the field"
    );
    let exactly_max = "é".repeat(100_000);
    let ok = api
        .post("/v1/chat", &key, &json!({"content": exactly_max}))
        .await?;
    assert_eq!(
        ok.status, 202,
        "100,000 characters are accepted: {}",
        ok.body
    );

    // Bad idempotency keys.
    for bad in ["", &"k".repeat(256), "has space", "tab\tkey"] {
        let r = api
            .raw(
                Method::POST,
                &submit,
                Some(&key),
                Some((json_ct, br#"{"content": "x"}"#.to_vec())),
                &[("idempotency-key", bad)],
            )
            .await;
        // A header with a control character may be refused by the client itself.
        if let Ok(r) = r {
            assert_eq!(
                (r.status, r.error_code()),
                (400, "invalid_request"),
                "idempotency key {bad:?}"
            );
        }
    }

    let after = row_counts(&env).await?;
    assert_eq!(
        (after.0, after.1, after.2),
        (before.0 + 1, before.1 + 1, before.2 + 1),
        "only the one valid /v1/chat stored anything"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn credentials_are_checked_and_admin_and_api_keys_are_not_interchangeable()
-> anyhow::Result<()> {
    let env = TestEnv::start(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let (key_id, key) = env.create_key("acme").await?;
    let api = &env.api;

    let no_auth = api
        .raw(Method::GET, "/v1/conversations", None, None, &[])
        .await?;
    assert_eq!(
        (no_auth.status, no_auth.error_code()),
        (401, "unauthorized")
    );
    let malformed = api
        .raw(
            Method::GET,
            "/v1/conversations",
            None,
            None,
            &[("authorization", "Basic Zm9vOmJhcg==")],
        )
        .await?;
    assert_eq!(malformed.status, 401);
    assert_eq!(
        api.get("/v1/conversations", "cq_unknown").await?.status,
        401
    );
    assert_eq!(
        api.get("/v1/conversations", ADMIN_TOKEN).await?.status,
        401,
        "the admin token is not an API key"
    );
    let as_admin = api
        .post("/admin/v1/api-keys", &key, &json!({"tenant": "x"}))
        .await?;
    assert_eq!(
        (as_admin.status, as_admin.error_code()),
        (401, "unauthorized"),
        "an API key is not the admin token"
    );
    assert_eq!(api.get("/v1/conversations", &key).await?.status, 200);

    // Key creation validation.
    for bad in [
        json!({}),
        json!({"tenant": ""}),
        json!({"tenant": "a", "rate_limit_per_minute": 0}),
        json!({"tenant": "a", "rate_limit_per_minute": 1_000_001}),
        json!({"tenant": "a", "x": 1}),
    ] {
        let r = api.admin_post("/admin/v1/api-keys", &bad).await?;
        assert_eq!(
            (r.status, r.error_code()),
            (400, "invalid_request"),
            "{bad}"
        );
    }

    // Keys are stored hashed: the key itself appears nowhere in the table.
    let stored: i64 = sqlx::query_scalar(
        "select count(*) from api_keys where encode(key_hash, 'escape') like '%' || $1 || '%'",
    )
    .bind(&key)
    .fetch_one(&env.db)
    .await?;
    assert_eq!(stored, 0);

    // A revoked key stops working at once, also on a replica that has just
    // authenticated it (and cached the lookup).
    let replica = spawn_api(&env, &[]).await?;
    let before = replica.api.get("/v1/conversations", &key).await?;
    assert_eq!(before.status, 200);
    let revoke = api
        .raw(
            Method::DELETE,
            &format!("/admin/v1/api-keys/{key_id}"),
            Some(ADMIN_TOKEN),
            None,
            &[],
        )
        .await?;
    assert_eq!(revoke.status, 204);
    let after = api.get("/v1/conversations", &key).await?;
    assert_eq!((after.status, after.error_code()), (401, "unauthorized"));
    // The other replica hears of it by NOTIFY, within milliseconds.
    eventually(
        "the replica refuses the revoked key",
        Duration::from_secs(2),
        || async {
            let r = replica.api.get("/v1/conversations", &key).await?;
            Ok((r.status == 401).then_some(()))
        },
    )
    .await?;
    let again = api
        .raw(
            Method::DELETE,
            &format!("/admin/v1/api-keys/{key_id}"),
            Some(ADMIN_TOKEN),
            None,
            &[],
        )
        .await?;
    assert_eq!(again.status, 404);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn busy_conversation_and_idempotency_keys_answer_409_or_replay() -> anyhow::Result<()> {
    let env = TestEnv::start(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let (_, key_a) = env.create_key("acme").await?;
    let (_, key_b) = env.create_key("globex").await?;
    let api = &env.api;
    let conv = api.create_conversation(&key_a, &json!({})).await?;
    let path = format!("/v1/conversations/{conv}/messages");
    let body = br#"{"content": "hi"}"#.to_vec();
    let ct = "application/json";

    let first = api
        .raw(
            Method::POST,
            &path,
            Some(&key_a),
            Some((ct, body.clone())),
            &[("idempotency-key", "k-1")],
        )
        .await?;
    assert_eq!(first.status, 202);
    let replay = api
        .raw(
            Method::POST,
            &path,
            Some(&key_a),
            Some((ct, body.clone())),
            &[("idempotency-key", "k-1")],
        )
        .await?;
    assert_eq!(
        (replay.status, replay.str("id")),
        (202, first.str("id")),
        "same key, same body: the original job"
    );
    let different = api
        .raw(
            Method::POST,
            &path,
            Some(&key_a),
            Some((ct, br#"{"content": "other"}"#.to_vec())),
            &[("idempotency-key", "k-1")],
        )
        .await?;
    assert_eq!(
        (different.status, different.error_code()),
        (409, "conflict")
    );
    let busy = api
        .post(&path, &key_a, &json!({"content": "again"}))
        .await?;
    assert_eq!((busy.status, busy.error_code()), (409, "conversation_busy"));

    // Concurrent twins with one key on a fresh conversation: one job, all 202.
    let conv2 = api.create_conversation(&key_a, &json!({})).await?;
    let path2 = format!("/v1/conversations/{conv2}/messages");
    let twins = (0..8).map(|_| {
        api.raw(
            Method::POST,
            &path2,
            Some(&key_a),
            Some((ct, br#"{"content": "twin"}"#.to_vec())),
            &[("idempotency-key", "k-twin")],
        )
    });
    let answers = futures_util::future::try_join_all(twins).await?;
    assert!(
        answers.iter().all(|r| r.status == 202),
        "{:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(
        answers.iter().all(|r| r.str("id") == answers[0].str("id")),
        "one job for all twins"
    );

    // Idempotency keys are per tenant.
    let conv_b = api.create_conversation(&key_b, &json!({})).await?;
    let b = api
        .raw(
            Method::POST,
            &format!("/v1/conversations/{conv_b}/messages"),
            Some(&key_b),
            Some((ct, body)),
            &[("idempotency-key", "k-1")],
        )
        .await?;
    assert_eq!(b.status, 202);
    assert_ne!(b.str("id"), first.str("id"));

    let jobs: i64 = sqlx::query_scalar("select count(*) from jobs")
        .fetch_one(&env.db)
        .await?;
    let user_msgs: i64 = sqlx::query_scalar("select count(*) from messages where role = 'user'")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(
        (jobs, user_msgs),
        (3, 3),
        "replays and conflicts stored nothing"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn another_tenants_resources_are_404_and_stay_unchanged() -> anyhow::Result<()> {
    let env = TestEnv::start(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let (_, a) = env.create_key("tenant-a").await?;
    let (_, b) = env.create_key("tenant-b").await?;
    let api = &env.api;
    let conv = api
        .create_conversation(&a, &json!({"metadata": {"owner": "a"}}))
        .await?;
    let job = api.submit(&a, &conv, "secret").await?;
    let job_id = job["id"].as_str().unwrap_or_default().to_owned();
    let snapshot = |db: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "select (select string_agg(id::text || status, ',' order by id) from jobs) ||
                    (select string_agg(id::text || content, ',' order by id) from messages) ||
                    (select string_agg(id::text || metadata::text, ',' order by id) from conversations)",
        )
        .fetch_one(&db)
        .await
    };
    let before = snapshot(env.db.clone()).await?;

    let attempts = [
        api.get(&format!("/v1/conversations/{conv}"), &b).await?,
        api.get(&format!("/v1/conversations/{conv}/messages"), &b)
            .await?,
        api.post(
            &format!("/v1/conversations/{conv}/messages"),
            &b,
            &json!({"content": "intrude"}),
        )
        .await?,
        api.delete(&format!("/v1/conversations/{conv}"), &b).await?,
        api.get(&format!("/v1/jobs/{job_id}"), &b).await?,
        api.get(&format!("/v1/jobs/{job_id}?wait=1"), &b).await?,
        api.post(&format!("/v1/jobs/{job_id}/cancel"), &b, &json!({}))
            .await?,
    ];
    for r in &attempts {
        assert_eq!((r.status, r.error_code()), (404, "not_found"), "{}", r.body);
    }
    let listed = api.get("/v1/conversations", &b).await?;
    assert_eq!(
        listed.body["data"],
        json!([]),
        "tenant B lists nothing of A's"
    );

    assert_eq!(
        snapshot(env.db.clone()).await?,
        before,
        "A's data is unchanged"
    );
    assert_eq!(
        api.get(&format!("/v1/jobs/{job_id}"), &a).await?.status,
        200
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn conversations_paginate_and_delete_removes_messages_and_jobs() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let api = &env.api;
    let mut ids = vec![];
    for i in 0..5 {
        ids.push(
            api.create_conversation(&key, &json!({"metadata": {"i": i}}))
                .await?,
        );
    }
    let page1 = api.get("/v1/conversations?limit=2", &key).await?;
    let got: Vec<&str> = page1.body["data"]
        .as_array()
        .map(|d| d.iter().filter_map(|c| c["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(got, vec![ids[4].as_str(), ids[3].as_str()], "newest first");
    let next = page1.str("next_after");
    let page2 = api
        .get(&format!("/v1/conversations?limit=2&after={next}"), &key)
        .await?;
    assert_eq!(page2.body["data"][0]["id"], ids[2].as_str());
    let last = api
        .get(&format!("/v1/conversations?limit=2&after={}", ids[1]), &key)
        .await?;
    assert_eq!(last.body["data"].as_array().map(Vec::len), Some(1));
    assert!(last.body["next_after"].is_null());

    let job = api.submit(&key, &ids[0], "bye").await?;
    let job_id = job["id"].as_str().unwrap_or_default().to_owned();
    let del = api
        .delete(&format!("/v1/conversations/{}", ids[0]), &key)
        .await?;
    assert_eq!(del.status, 204);
    assert_eq!(
        api.get(&format!("/v1/conversations/{}", ids[0]), &key)
            .await?
            .status,
        404
    );
    assert_eq!(
        api.get(&format!("/v1/jobs/{job_id}"), &key).await?.status,
        404
    );
    let left: i64 =
        sqlx::query_scalar("select count(*) from messages where conversation_id = $1::uuid")
            .bind(&ids[0])
            .fetch_one(&env.db)
            .await?;
    assert_eq!(left, 0);
    assert_eq!(
        api.delete(&format!("/v1/conversations/{}", ids[0]), &key)
            .await?
            .status,
        404
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn deleting_conversations_while_workers_answer_their_jobs_never_fails() -> anyhow::Result<()>
{
    // Found by schemathesis: a delete racing a worker that stores the job's
    // answer can deadlock in PostgreSQL; the api runs the delete again
    // instead of answering 500.
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 2,
        ..Default::default()
    })
    .await?;
    let mut clients = Vec::new();
    for client in 0..8u64 {
        let (api, key) = (env.api.clone(), key.clone());
        clients.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..60u64 {
                let conv = api.create_conversation(&key, &json!({})).await?;
                api.submit(&key, &conv, "hello").await?;
                // Spread the deletes over the job's life.
                let pause = (i * 397 + client * 911) % 4000;
                tokio::time::sleep(Duration::from_micros(pause)).await;
                let r = api
                    .delete(&format!("/v1/conversations/{conv}"), &key)
                    .await?;
                statuses.push((r.status, r.body));
            }
            anyhow::Ok(statuses)
        }));
    }
    for client in clients {
        for (status, body) in client.await?? {
            assert_eq!(status, 204, "{body}");
        }
    }
    env.cleanup().await;
    Ok(())
}
