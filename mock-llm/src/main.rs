//! `chatq-mock-llm` binary: serves the OpenAI-compatible mock LLM.

use std::io::Write;

use anyhow::Context;
use chatq_mock_llm::MockConfig;
use clap::{Parser, value_parser};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// OpenAI-compatible mock LLM server with configurable latency, streaming and fault injection.
///
/// Rate limits behave like a provider's (OpenAI). Each per-minute limit is a
/// token bucket of capacity = limit that starts full and refills
/// continuously at limit per --rate-window-ms: at most `limit` in a burst,
/// then limit/window steadily.
///
/// A chat completion call is admitted only if fewer than --max-concurrency
/// calls are in flight, the requests bucket holds at least 1 and the tokens
/// bucket holds at least the call's charge: its prompt tokens (ceil of the
/// characters of all message contents / 4, at least 1) plus its
/// `max_tokens` (else `max_completion_tokens`, else the completion tokens
/// the mock will produce). Admission debits both buckets; when the reply is
/// complete (or the client goes away) the tokens bucket gets back the charge
/// minus the `prompt_tokens + completion_tokens` reported in usage (all of
/// it for answers without usage, such as injected faults).
///
/// A refused call is not charged and gets 429 at once with OpenAI's
/// `rate_limit_exceeded` body (type `requests` or `tokens`), `Retry-After`
/// (whole seconds until the limiting bucket has room, at least 1) and
/// `retry-after-ms`. Every answer carries `x-ratelimit-limit-*`,
/// `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` (`*` = `requests`,
/// `tokens`) for the configured per-minute limits.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "CHATQ_MOCK_ADDR", default_value = "127.0.0.1:8090")]
    addr: String,
    /// Delay before answering every chat completion call, in milliseconds.
    #[arg(long, env = "CHATQ_MOCK_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
    /// Delay between streamed content chunks, in milliseconds.
    #[arg(long, env = "CHATQ_MOCK_CHUNK_DELAY_MS", default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Probability (0..=1) of answering 429 Too Many Requests.
    #[arg(long, env = "CHATQ_MOCK_RATE_429", default_value_t = 0.0, value_parser = parse_rate)]
    rate_429: f64,
    /// Probability (0..=1) of answering 500 Internal Server Error.
    #[arg(long, env = "CHATQ_MOCK_RATE_500", default_value_t = 0.0, value_parser = parse_rate)]
    rate_500: f64,
    /// Probability (0..=1) of answering 400 Bad Request.
    #[arg(long, env = "CHATQ_MOCK_RATE_400", default_value_t = 0.0, value_parser = parse_rate)]
    rate_400: f64,
    /// Probability (0..=1) of never answering.
    #[arg(long, env = "CHATQ_MOCK_RATE_HANG", default_value_t = 0.0, value_parser = parse_rate)]
    rate_hang: f64,
    /// Probability (0..=1) of answering with a 50 MiB body.
    #[arg(long, env = "CHATQ_MOCK_RATE_OVERSIZE", default_value_t = 0.0, value_parser = parse_rate)]
    rate_oversize: f64,
    /// Probability (0..=1) of answering 200 with truncated JSON.
    #[arg(long, env = "CHATQ_MOCK_RATE_MALFORMED", default_value_t = 0.0, value_parser = parse_rate)]
    rate_malformed: f64,
    /// Probability (0..=1) of answering a 307 redirect to an unreachable address.
    #[arg(long, env = "CHATQ_MOCK_RATE_REDIRECT", default_value_t = 0.0, value_parser = parse_rate)]
    rate_redirect: f64,
    /// Value of the Retry-After header sent with 429 answers, in seconds.
    #[arg(long, env = "CHATQ_MOCK_RETRY_AFTER_SECS", default_value_t = 1)]
    retry_after_secs: u64,
    /// Most chat completion calls in flight at once (unset: no limit).
    ///
    /// A call beyond it gets 429 (type `requests`) at once, with
    /// `Retry-After: 1`.
    #[arg(long, env = "CHATQ_MOCK_MAX_CONCURRENCY", value_parser = value_parser!(u64).range(1..))]
    max_concurrency: Option<u64>,
    /// Requests admitted per rate window (unset: no limit).
    ///
    /// A token bucket of this capacity, starting full and refilling
    /// continuously at this many per --rate-window-ms.
    #[arg(long, env = "CHATQ_MOCK_REQUESTS_PER_MINUTE", value_parser = value_parser!(u64).range(1..))]
    requests_per_minute: Option<u64>,
    /// Tokens admitted per rate window (unset: no limit).
    ///
    /// A token bucket of this capacity, starting full and refilling
    /// continuously at this many per --rate-window-ms. A call is charged its
    /// prompt tokens plus its completion budget; the unused part comes back
    /// when the reply is complete. A call charged more than the whole
    /// bucket is refused ("Request too large").
    #[arg(long, env = "CHATQ_MOCK_TOKENS_PER_MINUTE", value_parser = value_parser!(u64).range(1..))]
    tokens_per_minute: Option<u64>,
    /// Length of the rate limits' "minute", in milliseconds.
    ///
    /// Tests compress time with it: 2000 makes the per-minute limits mean
    /// "per 2 seconds".
    #[arg(long, env = "CHATQ_MOCK_RATE_WINDOW_MS", default_value_t = 60_000, value_parser = value_parser!(u64).range(1..))]
    rate_window_ms: u64,
}

/// Parses a probability in `0..=1`.
fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s
        .parse()
        .map_err(|err| format!("`{s}` is not a number: {err}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("`{s}` is not between 0 and 1"))
    }
}

impl Args {
    fn config(&self) -> MockConfig {
        MockConfig {
            latency_ms: self.latency_ms,
            chunk_delay_ms: self.chunk_delay_ms,
            rate_429: self.rate_429,
            rate_500: self.rate_500,
            rate_400: self.rate_400,
            rate_hang: self.rate_hang,
            rate_oversize: self.rate_oversize,
            rate_malformed: self.rate_malformed,
            rate_redirect: self.rate_redirect,
            retry_after_secs: self.retry_after_secs,
            max_concurrency: self.max_concurrency,
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            rate_window_ms: self.rate_window_ms,
        }
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(err) = try_main().await {
        tracing::error!("{err:?}");
        std::process::exit(1);
    }
}

async fn try_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config();
    config.validate().map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "chatq-mock-llm listening on http://{addr}")
            .and_then(|()| stdout.flush())
            .context("writing the listening line to stdout")?;
    }
    tracing::info!(%addr, ?config, "mock LLM started");
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let shutdown = async move {
        let ctrl_c = async {
            if let Err(err) = tokio::signal::ctrl_c().await {
                tracing::error!("waiting for Ctrl-C failed: {err}; only SIGTERM stops the server");
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = ctrl_c => {}
            _ = sigterm.recv() => {}
        }
    };
    chatq_mock_llm::serve(listener, config, shutdown)
        .await
        .context("serving")?;
    tracing::info!("stopped");
    Ok(())
}
