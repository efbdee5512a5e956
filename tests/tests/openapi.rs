//! `GET /openapi.json` documents exactly the routes the api serves, and
//! `GET /docs` shows it with nothing loaded from elsewhere.
//!
//! The served routes come from `chatq_api::routes::route_table()`, the list
//! the router itself is built from: a route added without documentation
//! (or documentation of a route that is gone) fails here.

use std::collections::BTreeSet;

use chatq_tests::{EnvOptions, TestEnv};
use reqwest::Method;
use serde_json::Value;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The OpenAPI spelling of an axum path: `{*id}` (a parameter that may
/// contain `/`) is `{id}`.
fn openapi_path(axum_path: &str) -> String {
    axum_path.replace("{*", "{")
}

/// Every operation of the document: (METHOD, path, operation).
fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            if METHODS.contains(&method.as_str()) {
                ops.push((method.to_uppercase(), path.clone(), op));
            }
        }
    }
    ops
}

/// Every `$ref` in `value`.
fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

/// The operation's responses, with `$ref`s to `components/responses` resolved.
fn responses<'a>(doc: &'a Value, op: &'a Value) -> Vec<(&'a str, &'a Value)> {
    op["responses"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(status, r)| {
            let resolved = r["$ref"]
                .as_str()
                .and_then(|p| doc.pointer(p.trim_start_matches('#')))
                .unwrap_or(r);
            (status.as_str(), resolved)
        })
        .collect()
}

#[tokio::test]
async fn the_document_covers_exactly_the_routes_served_and_every_ref_resolves() -> anyhow::Result<()>
{
    let env = TestEnv::start(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    // No credentials needed.
    let r = env
        .api
        .raw(Method::GET, "/openapi.json", None, None, &[])
        .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let doc = r.body;
    let version = doc["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3.1"), "openapi: {version:?}");

    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect();
    let served: BTreeSet<(String, String)> = chatq_api::routes::route_table()
        .into_iter()
        .map(|(method, path)| (method.as_str().to_owned(), openapi_path(path)))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let not_served: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && not_served.is_empty(),
        "served but not documented: {undocumented:?}; documented but not served: {not_served:?}"
    );

    let mut ids = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let what = format!("{method} {path}");
        let id = op["operationId"].as_str().unwrap_or_default();
        assert!(
            ids.insert(id.to_owned()),
            "{what}: operationId {id:?} is not unique"
        );
        let statuses: Vec<&str> = responses(&doc, op).iter().map(|(s, _)| *s).collect();
        assert!(
            statuses.iter().any(|s| s.starts_with('4')),
            "{what} documents no 4xx: {statuses:?}"
        );
        // Every body of an error answer is documented, with its shape.
        for (status, response) in responses(&doc, op) {
            if status.starts_with(['4', '5']) && status != "431" {
                assert!(
                    response["content"]["application/json"]["schema"].is_object(),
                    "{what} {status}: no JSON body documented: {response}"
                );
            }
        }
        // 429 and 503 always come with Retry-After.
        for (status, response) in responses(&doc, op) {
            if matches!(status, "429" | "503") && path != "/readyz" {
                assert!(
                    response["headers"]["Retry-After"].is_object(),
                    "{what} {status}: Retry-After is not documented"
                );
            }
        }
        // Every path parameter is documented.
        for piece in path.split('/') {
            if let Some(name) = piece.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                let documented = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["name"] == name && p["in"] == "path" && p["required"] == true);
                assert!(
                    documented,
                    "{what}: path parameter {name} is not documented"
                );
            }
        }
        // The API key for /v1, the admin token for /admin/v1, none elsewhere.
        let security: Vec<&str> = op["security"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_object)
            .flat_map(|s| s.keys().map(String::as_str))
            .collect();
        let expected: &[&str] = if path.starts_with("/v1/") {
            &["api_key"]
        } else if path.starts_with("/admin/v1/") {
            &["admin_token"]
        } else {
            &[]
        };
        assert_eq!(security, expected, "{what}: security");
        if !expected.is_empty() {
            assert!(statuses.contains(&"401"), "{what}: 401 is not documented");
        }
    }
    for scheme in ["api_key", "admin_token"] {
        let s = &doc["components"]["securitySchemes"][scheme];
        assert_eq!(
            (s["type"].as_str(), s["scheme"].as_str()),
            (Some("http"), Some("bearer")),
            "{scheme}: {s}"
        );
    }

    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let target = r.strip_prefix('#').and_then(|pointer| doc.pointer(pointer));
        assert!(target.is_some(), "$ref {r} does not resolve");
    }

    // hyper answers 431 (as documented for every operation) to a head over 64 KiB.
    let big = "x".repeat(70 * 1024);
    let r = env
        .api
        .raw(
            Method::GET,
            "/healthz",
            None,
            None,
            &[("x-big", big.as_str())],
        )
        .await?;
    assert_eq!(r.status, 431);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn the_docs_page_and_its_files_are_served_by_the_api_itself() -> anyhow::Result<()> {
    let env = TestEnv::start(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let get = |path: &str| {
        let url = format!("{}{path}", env.api.url);
        let http = env.api.http.clone();
        async move {
            let r = http.get(url).send().await?;
            let status = r.status().as_u16();
            let content_type = r
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = r.bytes().await?;
            anyhow::Ok((status, content_type, body))
        }
    };
    let (status, content_type, page) = get("/docs").await?;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let page = String::from_utf8(page.to_vec())?;
    assert!(
        !page.contains("http://") && !page.contains("https://") && !page.contains("//cdn"),
        "the page loads nothing from elsewhere:\n{page}"
    );
    // Everything it loads is served here.
    for asset in [
        "docs/swagger-ui-bundle.js",
        "docs/swagger-ui.css",
        "openapi.json",
    ] {
        assert!(page.contains(asset), "the page uses {asset}");
        let (status, content_type, body) = get(&format!("/{asset}")).await?;
        assert_eq!(status, 200, "/{asset}");
        assert!(body.len() > 1000, "/{asset} is {} bytes", body.len());
        let expected = match asset.rsplit('.').next() {
            Some("js") => "javascript",
            Some("css") => "text/css",
            _ => "application/json",
        };
        assert!(content_type.contains(expected), "/{asset}: {content_type}");
    }
    let r = env
        .api
        .raw(Method::GET, "/docs/no-such-file.js", None, None, &[])
        .await?;
    assert_eq!((r.status, r.error_code()), (404, "not_found"), "{}", r.body);
    env.cleanup().await;
    Ok(())
}
