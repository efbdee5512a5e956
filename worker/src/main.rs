//! `chatq-worker`: run until SIGTERM, or `--drain` to work the queue until
//! it is empty and exit.

use clap::Parser;
use tokio_util::sync::CancellationToken;

use chatq_worker::WorkerConfig;

/// chatq's worker.
#[derive(Debug, Parser)]
#[command(name = "chatq-worker", version, about)]
struct Cli {
    /// Work the queue until it is empty, then exit 0.
    #[arg(long)]
    drain: bool,
    #[command(flatten)]
    config: WorkerConfig,
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
    // reqwest is built without a default TLS provider: install ring's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let shutdown = CancellationToken::new();
    tokio::spawn(chatq_common::telemetry::cancel_on_signal(shutdown.clone()));
    println!("chatq-worker started");
    chatq_worker::run(cli.config, shutdown, cli.drain).await?;
    Ok(())
}
