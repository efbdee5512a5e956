//! The machine's own limits, measured with the same concurrency as the
//! scenario: single-row INSERT+COMMIT transactions/s on PostgreSQL, and
//! confirmed persistent publishes/s to a durable quorum queue on RabbitMQ.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::load::{self, LoadResult, Outcome, Stop};

/// PostgreSQL's `max_connections` is 100 and chatq's own pools hold some:
/// the INSERT baseline uses at most this many connections.
pub const MAX_PG_CONNECTIONS: usize = 32;

/// Single-row `insert` in autocommit (one fsync'd commit each) from
/// `min(clients, MAX_PG_CONNECTIONS)` connections, on a scratch table of the
/// database at `db_url`, for `duration`.
pub async fn pg_inserts(
    db_url: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let conns = clients.clamp(1, MAX_PG_CONNECTIONS);
    let pool = PgPoolOptions::new()
        .max_connections(conns as u32)
        .min_connections(conns as u32)
        .acquire_timeout(Duration::from_secs(10))
        .connect(db_url)
        .await
        .context("connecting the INSERT baseline pool")?;
    sqlx::query("drop table if exists bench_scratch")
        .execute(&pool)
        .await?;
    sqlx::query(
        "create table bench_scratch (id uuid primary key, body text not null, created_at timestamptz not null default now())",
    )
    .execute(&pool)
    .await?;
    let p = pool.clone();
    let mut result = load::run(conns, Stop::After(duration), move |_, _| {
        let p = p.clone();
        async move {
            let r = sqlx::query("insert into bench_scratch (id, body) values ($1, $2)")
                .bind(Uuid::now_v7())
                .bind("benchmark row")
                .execute(&p)
                .await;
            match r {
                Ok(_) => Outcome::Ok,
                Err(_) => Outcome::Err("sql".into()),
            }
        }
    })
    .await;
    result.clients = conns;
    let _ = sqlx::query("drop table if exists bench_scratch")
        .execute(&pool)
        .await;
    pool.close().await;
    Ok(result)
}

/// `clients` publisher tasks, each with its own confirm-mode channel,
/// publishing persistent messages to a scratch durable quorum queue and
/// awaiting each confirm, for `duration`. The queue is deleted after.
pub async fn rabbit_publishes(
    amqp_url: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let clients = clients.max(1);
    // A few connections, channels spread over them (as a few api replicas would).
    let n_conns = clients.div_ceil(64).clamp(1, 4);
    let mut conns = Vec::new();
    for _ in 0..n_conns {
        let c = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to RabbitMQ at {amqp_url} (is it running?)"))?;
        conns.push(c);
    }
    let queue = format!(
        "bench_scratch_{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    let admin = conns[0].create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    admin
        .queue_declare(queue.as_str().into(), opts, args)
        .await?;
    let mut channels = Vec::with_capacity(clients);
    for i in 0..clients {
        let ch = conns[i % n_conns].create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        channels.push(ch);
    }
    let channels = Arc::new(channels);
    let q = Arc::new(queue.clone());
    let body: Arc<[u8]> = Arc::from(&br#"{"job_id":"0192f0c0-0000-7000-8000-000000000000"}"#[..]);
    let result = load::run(clients, Stop::After(duration), move |client, _| {
        let channels = Arc::clone(&channels);
        let q = Arc::clone(&q);
        let body = Arc::clone(&body);
        async move {
            let Some(ch) = channels.get(client) else {
                return Outcome::Err("no_channel".into());
            };
            let props = lapin::BasicProperties::default().with_delivery_mode(2);
            let publish = ch
                .basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await;
            match publish {
                Ok(confirm) => match confirm.await {
                    Ok(c) if c.is_ack() => Outcome::Ok,
                    Ok(_) => Outcome::Err("nack".into()),
                    Err(_) => Outcome::Err("confirm".into()),
                },
                Err(_) => Outcome::Err("publish".into()),
            }
        }
    })
    .await;
    let _ = admin
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    for c in conns {
        let _ = c.close(200, "bench done".into()).await;
    }
    Ok(result)
}
