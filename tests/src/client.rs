//! A small HTTP client for the api, one helper per kind of call.

use std::time::Duration;

use anyhow::bail;
use reqwest::Method;
use serde_json::Value;

/// A response: status, headers and the body as JSON (`Null` if empty or
/// not JSON).
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// Parsed body.
    pub body: Value,
}

impl Response {
    /// A string field of the body (empty if absent).
    pub fn str(&self, field: &str) -> String {
        self.body[field].as_str().unwrap_or_default().to_owned()
    }

    /// The error code of an error body.
    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }

    /// A header as a string.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// Client for one api process.
#[derive(Clone)]
pub struct Api {
    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    /// The underlying client.
    pub http: reqwest::Client,
}

impl Api {
    /// A client for the api at `url`.
    pub fn new(url: String) -> Self {
        crate::init_tls();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build()
            .expect("a plain HTTP client builds");
        Self { url, http }
    }

    /// Sends a request; `key` is the bearer token, `body` raw bytes with a
    /// content type.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Response> {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some((content_type, bytes)) = body {
            req = req.header("content-type", content_type).body(bytes);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// GET with a key.
    pub async fn get(&self, path: &str, key: &str) -> anyhow::Result<Response> {
        self.raw(Method::GET, path, Some(key), None, &[]).await
    }

    /// POST JSON with a key.
    pub async fn post(&self, path: &str, key: &str, body: &Value) -> anyhow::Result<Response> {
        self.raw(
            Method::POST,
            path,
            Some(key),
            Some(("application/json", serde_json::to_vec(body)?)),
            &[],
        )
        .await
    }

    /// DELETE with a key.
    pub async fn delete(&self, path: &str, key: &str) -> anyhow::Result<Response> {
        self.raw(Method::DELETE, path, Some(key), None, &[]).await
    }

    /// POST JSON with the admin token.
    pub async fn admin_post(&self, path: &str, body: &Value) -> anyhow::Result<Response> {
        self.post(path, crate::ADMIN_TOKEN, body).await
    }

    /// Creates a conversation, returning its id.
    pub async fn create_conversation(&self, key: &str, body: &Value) -> anyhow::Result<String> {
        let r = self.post("/v1/conversations", key, body).await?;
        if r.status != 201 {
            bail!("creating a conversation answered {}: {}", r.status, r.body);
        }
        Ok(r.str("id"))
    }

    /// Submits a message, returning the job (202 expected).
    pub async fn submit(
        &self,
        key: &str,
        conversation: &str,
        content: &str,
    ) -> anyhow::Result<Value> {
        let r = self
            .post(
                &format!("/v1/conversations/{conversation}/messages"),
                key,
                &serde_json::json!({"content": content}),
            )
            .await?;
        if r.status != 202 {
            bail!("submitting answered {}: {}", r.status, r.body);
        }
        Ok(r.body)
    }

    /// Long-polls a job until it is terminal (or `deadline` passes).
    pub async fn wait_terminal(
        &self,
        key: &str,
        job_id: &str,
        deadline: Duration,
    ) -> anyhow::Result<Value> {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let r = self.get(&format!("/v1/jobs/{job_id}?wait=10"), key).await?;
            if r.status != 200 {
                bail!("polling job {job_id} answered {}: {}", r.status, r.body);
            }
            let status = r.body["status"].as_str().unwrap_or_default();
            if matches!(status, "succeeded" | "failed" | "cancelled") {
                return Ok(r.body);
            }
            if tokio::time::Instant::now() >= end {
                bail!("job {job_id} still {status} after {deadline:?}");
            }
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        for _ in 0..300 {
            if let Ok(r) = self.raw(Method::GET, "/readyz", None, None, &[]).await
                && r.status == 200
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the api never became ready")
    }
}
