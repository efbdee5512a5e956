//! The api against its own OpenAPI document, with schemathesis (a tool
//! nobody on this team wrote): generated valid and invalid requests to every
//! documented operation, checking that the api never answers 5xx where none
//! is documented, and that every status, content type and body it answers is
//! the one the document gives.
//!
//! schemathesis comes from the venv `scripts/test.sh` makes
//! (`CHATQ_TEST_PYTHON` is its python; the CLI sits next to it).

use std::path::PathBuf;
use std::time::Duration;

use chatq_tests::{ADMIN_TOKEN, EnvOptions, TestEnv, env_of};

/// The checks run on every response.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance";

/// Generated cases per operation and phase (`CHATQ_SCHEMATHESIS_MAX_EXAMPLES`
/// overrides it): well within two minutes on 2 cores.
const MAX_EXAMPLES: &str = "50";

/// The seed of the generated cases (`CHATQ_SCHEMATHESIS_SEED` overrides
/// it): the same cases on every run (only their interleaving on the two
/// workers varies), so a finding reproduces.
const DEFAULT_SEED: &str = "12";

/// Paths not tested here, and why.
const EXCLUDED: [&str; 1] = [
    // Pausing consumption leaves every job created afterwards queued until a
    // resume comes (if one ever does): the event streams and long polls of
    // the other generated cases would then hang until the client's timeout.
    // Pause is tested in tests/tests/pipeline.rs and hardening.rs.
    "/admin/v1/queues/pause",
];

/// The schemathesis CLI of the venv `scripts/test.sh` makes.
fn schemathesis() -> PathBuf {
    let python = std::env::var("CHATQ_TEST_PYTHON").map_or_else(
        |_| PathBuf::from("/var/tmp/chatq-venv/bin/python"),
        PathBuf::from,
    );
    let cli = python.with_file_name("schemathesis");
    assert!(
        cli.exists(),
        "{} is missing: run scripts/test.sh, which creates the venv with schemathesis",
        cli.display()
    );
    cli
}

#[tokio::test]
async fn the_api_answers_as_its_openapi_document_says() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 1,
        // A completion that waits longer (a documented 504) ends before
        // schemathesis' own request timeout.
        api_env: env_of(&[("CHATQ_COMPLETIONS_TIMEOUT_SECS", "20")]),
        ..Default::default()
    })
    .await?;
    let dir = std::env::temp_dir().join(format!("chatq-schemathesis-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    // Each security scheme of the document gets its own credential; the
    // values come from the environment, not the command line.
    let config = dir.join("schemathesis.toml");
    std::fs::write(
        &config,
        "[auth.openapi.api_key]\nbearer = \"${CHATQ_API_KEY}\"\n\n\
         [auth.openapi.admin_token]\nbearer = \"${CHATQ_ADMIN_TOKEN}\"\n",
    )?;
    let seed = std::env::var("CHATQ_SCHEMATHESIS_SEED").unwrap_or_else(|_| DEFAULT_SEED.into());
    let max_examples =
        std::env::var("CHATQ_SCHEMATHESIS_MAX_EXAMPLES").unwrap_or_else(|_| MAX_EXAMPLES.into());
    let mut cmd = tokio::process::Command::new(schemathesis());
    cmd.current_dir(&dir)
        .env("CHATQ_API_KEY", &key)
        .env("CHATQ_ADMIN_TOKEN", ADMIN_TOKEN)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/openapi.json", env.api.url))
        .args(["--checks", CHECKS])
        .args(["--max-examples", &max_examples])
        .args(["--seed", &seed])
        .args(["--workers", "2"])
        .args(["--request-timeout", "90"])
        .args(["--generation-database", "none"])
        .arg("--no-color")
        .kill_on_drop(true);
    for path in EXCLUDED {
        cmd.args(["--exclude-path", path]);
    }
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(
        out.status.success(),
        "schemathesis found failures (seed {seed}):\n{stdout}\n{stderr}"
    );
    env.cleanup().await;
    Ok(())
}
