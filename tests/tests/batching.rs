//! Group commit of submissions, claims and results: concurrent callers
//! share one statement, yet each caller gets the answer it would have got
//! alone, and a batch stores exactly what it reports.

use std::collections::{HashMap, HashSet};

use chatq_common::db::submissions::{self, NewTurn};
use chatq_common::domain::{Conversation, Priority, new_id};
use chatq_tests::{EnvOptions, TestEnv};
use serde_json::json;
use uuid::Uuid;

fn turn(tenant_id: Uuid, conversation_id: Uuid, model: &str, content: &str) -> NewTurn {
    NewTurn {
        job_id: new_id(),
        tenant_id,
        conversation_id,
        new_conversation: None,
        model: model.into(),
        max_tokens: None,
        temperature: None,
        message_id: new_id(),
        content: content.into(),
        priority: Priority::Interactive,
        sampling: None,
        trace_parent: None,
        key: None,
    }
}

async fn tenant_of(env: &TestEnv, conversation: &str) -> anyhow::Result<Uuid> {
    Ok(
        sqlx::query_scalar("select tenant_id from conversations where id = $1::uuid")
            .bind(conversation)
            .fetch_one(&env.db)
            .await?,
    )
}

#[tokio::test]
async fn one_statement_stores_a_batch_and_skips_busy_missing_and_foreign_conversations()
-> anyhow::Result<()> {
    let (env, key_a) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let (_, key_b) = env.create_key("globex").await?;
    let x = env.api.create_conversation(&key_a, &json!({})).await?;
    let z = env
        .api
        .create_conversation(&key_a, &json!({"model": "m-z"}))
        .await?;
    let foreign = env.api.create_conversation(&key_b, &json!({})).await?;
    let a = tenant_of(&env, &x).await?;
    let (x, z, foreign) = (x.parse()?, z.parse()?, foreign.parse()?);

    let busy_1 = turn(a, x, "", "first");
    let busy_2 = turn(a, x, "", "second");
    let other_tenant = turn(a, foreign, "", "not yours");
    let missing = turn(a, new_id(), "", "nowhere");
    let overridden = turn(a, z, "override", "with a model");
    let mut fresh = turn(a, new_id(), "", "new conversation");
    fresh.new_conversation = Some(Conversation {
        id: fresh.conversation_id,
        tenant_id: a,
        system_prompt: Some("be brief".into()),
        model: "m-new".into(),
        metadata: json!({"k": "v"}),
        created_at: chrono::Utc::now(),
    });
    let batch = vec![
        busy_1.clone(),
        busy_2.clone(),
        other_tenant.clone(),
        missing.clone(),
        overridden.clone(),
        fresh.clone(),
    ];

    let stored = submissions::submit_many(&env.db, &batch).await?;

    let models: HashMap<Uuid, String> = stored.iter().map(|j| (j.id, j.model.clone())).collect();
    assert_eq!(stored.len(), 3, "{models:?}");
    assert!(
        models.contains_key(&busy_1.job_id) != models.contains_key(&busy_2.job_id),
        "exactly one turn of the busy conversation is stored"
    );
    assert_eq!(
        models.get(&overridden.job_id).map(String::as_str),
        Some("override")
    );
    assert_eq!(models.get(&fresh.job_id).map(String::as_str), Some("m-new"));
    let winner = if models.contains_key(&busy_1.job_id) {
        &busy_1
    } else {
        &busy_2
    };

    // Each stored job has exactly its user message; skipped turns left nothing.
    let rows: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
        "select job_id, conversation_id, content from messages where role = 'user' order by seq",
    )
    .fetch_all(&env.db)
    .await?;
    let expected: HashSet<(Uuid, Uuid, String)> = [winner, &overridden, &fresh]
        .into_iter()
        .map(|t| (t.job_id, t.conversation_id, t.content.clone()))
        .collect();
    assert_eq!(rows.into_iter().collect::<HashSet<_>>(), expected);
    let jobs: i64 = sqlx::query_scalar("select count(*) from jobs")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(jobs, 3);
    let (prompt, metadata): (Option<String>, serde_json::Value) = sqlx::query_as(
        "select system_prompt, metadata from conversations where id = $1 and tenant_id = $2",
    )
    .bind(fresh.conversation_id)
    .bind(a)
    .fetch_one(&env.db)
    .await?;
    assert_eq!(
        (prompt.as_deref(), metadata),
        (Some("be brief"), json!({"k": "v"}))
    );

    // The worker's batched prompt read: each conversation of the tenant with
    // its system prompt and history; another tenant's is absent.
    let sources = chatq_common::db::messages::prompt_sources(
        &env.db,
        &[(a, fresh.conversation_id), (a, foreign), (a, x)],
    )
    .await?;
    let history =
        |c: &Uuid| -> Vec<String> { sources[c].1.iter().map(|m| m.content.clone()).collect() };
    assert_eq!(sources.len(), 2);
    assert_eq!(
        sources[&fresh.conversation_id].0.as_deref(),
        Some("be brief")
    );
    assert_eq!(history(&fresh.conversation_id), vec!["new conversation"]);
    assert_eq!(history(&x), vec![winner.content.clone()]);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn concurrent_submissions_each_get_the_answer_they_would_get_alone() -> anyhow::Result<()> {
    let (env, key_a) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let (_, key_b) = env.create_key("globex").await?;
    let api = &env.api;
    let busy = api.create_conversation(&key_a, &json!({})).await?;
    let foreign = api.create_conversation(&key_b, &json!({})).await?;
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(api.create_conversation(&key_a, &json!({})).await?);
    }

    let to = |conversation: &str| format!("/v1/conversations/{conversation}/messages");
    let mut requests = Vec::new();
    for i in 0..16 {
        requests.push(("busy", to(&busy), format!("busy {i}")));
    }
    for i in 0..8 {
        requests.push(("foreign", to(&foreign), format!("foreign {i}")));
        requests.push((
            "missing",
            to(&Uuid::new_v4().to_string()),
            format!("missing {i}"),
        ));
    }
    for (i, conversation) in idle.iter().enumerate() {
        requests.push(("idle", to(conversation), format!("idle {i}")));
    }
    for i in 0..32 {
        requests.push(("chat", "/v1/chat".to_string(), format!("chat {i}")));
    }
    let bodies: Vec<serde_json::Value> = requests
        .iter()
        .map(|(_, _, content)| json!({"content": content}))
        .collect();
    let answers = futures_util::future::try_join_all(
        requests
            .iter()
            .zip(&bodies)
            .map(|((_, path, _), body)| api.post(path, &key_a, body)),
    )
    .await?;

    let mut by_kind: HashMap<&str, Vec<(u16, String)>> = HashMap::new();
    let mut accepted: HashMap<String, (String, String)> = HashMap::new();
    for ((kind, _, content), r) in requests.iter().zip(&answers) {
        by_kind
            .entry(kind)
            .or_default()
            .push((r.status, r.error_code().to_string()));
        if r.status == 202 {
            accepted.insert(r.str("id"), (r.str("conversation_id"), content.clone()));
        }
    }
    let count = |kind: &str, status: u16, code: &str| {
        by_kind[kind]
            .iter()
            .filter(|(s, c)| *s == status && c == code)
            .count()
    };
    assert_eq!(count("busy", 202, ""), 1, "{:?}", by_kind["busy"]);
    assert_eq!(
        count("busy", 409, "conversation_busy"),
        15,
        "{:?}",
        by_kind["busy"]
    );
    assert_eq!(
        count("foreign", 404, "not_found"),
        8,
        "{:?}",
        by_kind["foreign"]
    );
    assert_eq!(
        count("missing", 404, "not_found"),
        8,
        "{:?}",
        by_kind["missing"]
    );
    assert_eq!(count("idle", 202, ""), 16, "{:?}", by_kind["idle"]);
    assert_eq!(count("chat", 202, ""), 32, "{:?}", by_kind["chat"]);

    // PostgreSQL holds exactly the accepted turns, each in its conversation.
    let rows: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
        "select m.job_id, m.conversation_id, m.content from messages m
         join jobs j on j.id = m.job_id and j.conversation_id = m.conversation_id
         where m.role = 'user' and j.status = 'queued'",
    )
    .fetch_all(&env.db)
    .await?;
    let stored: HashMap<String, (String, String)> = rows
        .into_iter()
        .map(|(job, conversation, content)| (job.to_string(), (conversation.to_string(), content)))
        .collect();
    assert_eq!(stored, accepted);
    let (jobs, messages, chat_conversations): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from jobs), (select count(*) from messages),
                (select count(*) from conversations) - 18",
    )
    .fetch_one(&env.db)
    .await?;
    assert_eq!((jobs, messages, chat_conversations), (49, 49, 32));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn batched_claims_and_results_honour_each_claim_token() -> anyhow::Result<()> {
    use chatq_common::db::jobs::{self, Success};
    use std::time::Duration;

    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let mut ids = Vec::new();
    for i in 0..3 {
        let job = env
            .api
            .post("/v1/chat", &key, &json!({"content": format!("hi {i}")}))
            .await?;
        ids.push(job.str("id").parse::<Uuid>()?);
    }
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let lease = Duration::from_secs(30);

    // Messages are tokens of work: each claims the next job in start order
    // (one tenant: submission order), whatever job it names, except a
    // message naming no job at all, which claims nothing.
    let claimed_by = |claimed: &[chatq_common::domain::Job]| -> Vec<(Uuid, Uuid)> {
        claimed
            .iter()
            .map(|j| (j.id, j.claim_token.unwrap_or_default()))
            .collect()
    };
    let (poison, t1) = (Uuid::now_v7(), Uuid::new_v4());
    let first =
        jobs::claim_many(&env.db, &[(poison, Uuid::new_v4()), (b, t1)], None, lease).await?;
    assert_eq!(
        claimed_by(&first),
        vec![(a, t1)],
        "the poison message claims nothing"
    );
    // Job a delivered again, twice, and c: b and c are claimed, once each;
    // the third message finds nothing left.
    let (t2, t3, t4) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let mut rest =
        claimed_by(&jobs::claim_many(&env.db, &[(a, t2), (a, t3), (c, t4)], None, lease).await?);
    rest.sort();
    let mut expected = vec![(b, t2), (c, t3)];
    expected.sort();
    assert_eq!(rest, expected);
    assert!(
        jobs::claim_many(&env.db, &[(b, Uuid::new_v4())], None, lease)
            .await?
            .is_empty()
    );
    let (ta, tb) = (t1, t2);

    // Results are written only under the claim's token.
    let success = |id, token, text: &str| Success {
        id,
        token,
        message_id: new_id(),
        content: text.into(),
        finish_reason: "stop".into(),
        prompt_tokens: Some(1),
        completion_tokens: Some(2),
    };
    let loser = t3;
    let written = jobs::succeed_many(
        &env.db,
        &[success(a, loser, "stale"), success(b, tb, "reply b")],
    )
    .await?;
    assert_eq!(written, vec![(b, tb)]);
    let written = jobs::succeed_many(&env.db, &[success(a, ta, "reply a")]).await?;
    assert_eq!(written, vec![(a, ta)]);

    let replies: Vec<(Uuid, String)> = sqlx::query_as(
        "select job_id, content from messages where role = 'assistant' order by content",
    )
    .fetch_all(&env.db)
    .await?;
    assert_eq!(replies, vec![(a, "reply a".into()), (b, "reply b".into())]);
    let states: Vec<(Uuid, String, Option<String>)> =
        sqlx::query_as("select id, status, result_content from jobs order by id")
            .fetch_all(&env.db)
            .await?;
    let states: HashMap<Uuid, (String, Option<String>)> =
        states.into_iter().map(|(id, s, r)| (id, (s, r))).collect();
    assert_eq!(states[&a], ("succeeded".into(), Some("reply a".into())));
    assert_eq!(states[&b], ("succeeded".into(), Some("reply b".into())));
    assert_eq!(states[&c], ("running".into(), None));
    env.cleanup().await;
    Ok(())
}
