//! `chatq-api`: serve the HTTP API, or `chatq-api migrate` to apply the
//! database migrations and exit.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use chatq_api::{ApiConfig, AppState};

/// chatq's HTTP API.
#[derive(Debug, Parser)]
#[command(name = "chatq-api", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: ApiConfig,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Apply pending migrations and exit.
    Migrate,
}

#[tokio::main]
async fn main() {
    chatq_common::telemetry::init();
    let result = try_main().await;
    // The last spans, when traces are exported (a blocking flush).
    let _ = tokio::task::spawn_blocking(chatq_common::telemetry::shutdown).await;
    if let Err(err) = result {
        tracing::error!("{err:?}");
        std::process::exit(1);
    }
}

async fn try_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    if matches!(cli.command, Some(Command::Migrate)) || config.migrate_on_start {
        let pool = config.db.pool().context("configuring the postgres pool")?;
        migrate(&pool).await?;
        if cli.command.is_some() {
            return Ok(());
        }
    }
    let shutdown = CancellationToken::new();
    let grace = config.shutdown_grace;
    let listener = bind(&config.addr)
        .await
        .with_context(|| format!("binding {}", config.addr))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let state = AppState::new(config, &shutdown).context("setting up")?;
    // Test harnesses and scripts read the bound address from this line.
    println!("chatq-api listening on http://{addr}");
    std::io::stdout().flush().context("writing to stdout")?;
    tracing::info!(%addr, "listening");

    tokio::spawn(chatq_common::telemetry::cancel_on_signal(shutdown.clone()));
    let server = tokio::spawn(chatq_api::serve(listener, state, shutdown.clone()));
    shutdown.cancelled().await;
    match tokio::time::timeout(grace, server).await {
        Ok(joined) => joined.context("server task")?.context("serving")?,
        Err(_) => tracing::warn!(
            grace_secs = grace.as_secs(),
            "in-flight requests outlived the grace period"
        ),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Connections the kernel may hold waiting for `accept` (tokio's default,
/// 128, overflows in bursts of new clients, which then stall 1–3 s in SYN
/// retries).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the listen address with a deep accept backlog.
async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let addr = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("the address resolves to nothing"))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How long start-up waits for PostgreSQL to come up before giving up.
const MIGRATE_WAIT: Duration = Duration::from_secs(60);

/// Applies the migrations, waiting (with backoff) while the database is
/// unreachable, so the api can start before PostgreSQL does.
async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        match chatq_common::MIGRATOR.run(pool).await {
            Ok(()) => {
                tracing::info!("migrations applied");
                return Ok(());
            }
            Err(sqlx::migrate::MigrateError::Execute(err))
                if chatq_common::db::is_unavailable(&err) && started.elapsed() < MIGRATE_WAIT =>
            {
                tracing::warn!(error = %err, "database unavailable; retrying migrations");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(err) => return Err(err).context("applying migrations"),
        }
    }
}
