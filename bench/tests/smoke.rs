//! Smoke test: `chatq-bench all --quick` against the real PostgreSQL and
//! RabbitMQ with the debug binaries next to the bench binary (build them
//! first: `cargo build --workspace --bins`). Fails loudly, never skips, when
//! PostgreSQL or RabbitMQ is unreachable (the bench exits non-zero).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn all_quick_writes_a_report_with_no_lost_or_duplicated_jobs() {
    let dir = std::env::temp_dir().join(format!("chatq-bench-smoke-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("create the temp dir");
    let report = dir.join("REPORT.md");
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatq-bench"))
        .args(["all", "--quick", "--out"])
        .arg(&dir)
        .arg("--report")
        .arg(&report)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start chatq-bench");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll chatq-bench") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chatq-bench all --quick did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = reader.join().unwrap_or_default();
    println!("{out}");
    assert!(
        status.success(),
        "chatq-bench all --quick failed ({status}); are PostgreSQL (127.0.0.1:5432) and \
         RabbitMQ (127.0.0.1:5672) running, and the binaries built \
         (cargo build --workspace --bins)?"
    );

    let md = std::fs::read_to_string(&report).expect("the report was written");
    for scenario in [
        "submit",
        "overhead",
        "burst",
        "concurrency",
        "reads",
        "scaling",
        "stream",
        "facade",
        "instrumentation",
    ] {
        assert!(md.contains(scenario), "the report mentions {scenario}");
    }
    assert!(dir.join("latency.svg").exists(), "the SVG was written");

    let raw = std::fs::read_to_string(dir.join("burst.json")).expect("burst.json was written");
    let burst: serde_json::Value = serde_json::from_str(&raw).expect("burst.json is JSON");
    let runs = burst["runs"].as_array().expect("burst runs");
    assert_eq!(
        runs.len(),
        4,
        "one burst run per worker count, then one with a capped queue: {burst}"
    );
    assert!(
        runs[3]["queue_max"].as_u64().is_some(),
        "the last run caps the queue: {burst}"
    );
    for run in runs {
        assert_eq!(run["lost"], 0, "no accepted job lost: {run}");
        assert_eq!(run["duplicates"], 0, "no duplicated job: {run}");
        assert!(
            run["accepted"].as_u64().unwrap_or(0) > 0,
            "jobs accepted: {run}"
        );
    }

    let raw = std::fs::read_to_string(dir.join("stream.json")).expect("stream.json was written");
    let stream: serde_json::Value = serde_json::from_str(&raw).expect("stream.json is JSON");
    for row in stream["ttft"].as_array().expect("ttft rows") {
        assert!(
            row["chatq"]["count"].as_u64().unwrap_or(0) > 0
                && row["errors"] == serde_json::json!({}),
            "every time-to-first-token job streamed: {row}"
        );
    }
    let held = &stream["held"];
    assert!(
        held["held"].as_u64().unwrap_or(0) > 0 && held["held"] == held["subscribers"],
        "every subscriber was held: {held}"
    );
    assert_eq!(
        held["done"], held["held"],
        "every held subscriber got `done`: {held}"
    );
    for row in stream["rate"].as_array().expect("rate rows") {
        assert_eq!(
            row["done"], row["subscribers"],
            "every subscriber got `done`: {row}"
        );
    }
    for resume in stream["resume"].as_array().expect("resume rows") {
        assert!(
            resume["first_text"]["count"].as_u64().unwrap_or(0) > 0,
            "resumes were measured: {resume}"
        );
        assert_eq!(
            resume["exact_text"], resume["jobs"],
            "resumed streams lose and repeat no text: {resume}"
        );
    }
    let raw = std::fs::read_to_string(dir.join("facade.json")).expect("facade.json was written");
    let facade: serde_json::Value = serde_json::from_str(&raw).expect("facade.json is JSON");
    let rows = facade["light"]["rows"]
        .as_array()
        .expect("facade light rows");
    assert_eq!(rows.len(), 3, "plain, first chunk, [DONE]: {facade}");
    for row in rows {
        assert!(
            row["chatq"]["count"].as_u64().unwrap_or(0) > 0
                && row["chatq"]["count"] == row["direct"]["count"],
            "facade pairs were timed on both sides: {row}"
        );
        assert_eq!(
            row["text_mismatches"], 0,
            "chatq returned the mock's text: {row}"
        );
    }
    assert!(
        facade["burst"]["load"]["ok"].as_u64().unwrap_or(0) > 0,
        "facade burst requests were answered: {}",
        facade["burst"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
