//! HTTP client for the `/v1` API, used by the CLI's client commands.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// An error the API answered, or a failure to reach it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{message} (HTTP {status}, code {code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot reach the CloudAI host at {host}: {source}")]
    Unreachable {
        host: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("unexpected answer from the host: {0}")]
    Protocol(String),
}

/// What a client trusts and presents over HTTPS (`--ca-cert`, `--client-cert`,
/// `--client-key`), read and checked once, when the command starts.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// Trusted besides the public web PKI's roots (a private CA).
    roots: Vec<reqwest::Certificate>,
    /// Presented to a host that asks for client certificates (mutual TLS).
    identity: Option<reqwest::Identity>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("roots", &self.roots.len())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

impl ClientTls {
    /// Reads the PEM files; an unreadable or empty file is an error naming it.
    pub fn load(
        ca_cert: Option<&Path>,
        client_cert: Option<&Path>,
        client_key: Option<&Path>,
    ) -> anyhow::Result<ClientTls> {
        let read = |flag: &str, path: &Path| {
            std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
        };
        let mut tls = ClientTls::default();
        if let Some(path) = ca_cert {
            tls.roots = reqwest::Certificate::from_pem_bundle(&read("--ca-cert", path)?)
                .with_context(|| format!("--ca-cert {}: not PEM certificates", path.display()))?;
            if tls.roots.is_empty() {
                bail!(
                    "--ca-cert {}: no certificate in it (expected PEM \"BEGIN CERTIFICATE\" blocks)",
                    path.display()
                );
            }
        }
        match (client_cert, client_key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                // reqwest reads the key and the chain from one PEM buffer.
                let mut pem = read("--client-cert", cert)?;
                pem.push(b'\n');
                pem.extend(read("--client-key", key)?);
                tls.identity = Some(reqwest::Identity::from_pem(&pem).with_context(|| {
                    format!(
                        "--client-cert {} with --client-key {}: expected PEM certificates and a PEM private key",
                        cert.display(),
                        key.display()
                    )
                })?);
            }
            _ => bail!("--client-cert and --client-key go together"),
        }
        Ok(tls)
    }

    fn apply(&self, mut builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        for root in &self.roots {
            builder = builder.add_root_certificate(root.clone());
        }
        if let Some(identity) = &self.identity {
            builder = builder.identity(identity.clone());
        }
        builder
    }
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(host: &str, tls: &ClientTls, token: Option<String>) -> Result<Self, ClientError> {
        let http = tls
            .apply(reqwest::Client::builder())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError::Protocol(format!("building the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: host.trim_end_matches('/').to_string(),
            token,
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let builder = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Sends a request and decodes a JSON answer, turning API errors into [`ClientError::Api`].
    pub async fn send<T: DeserializeOwned>(
        &self,
        builder: RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = builder
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                host: self.base.clone(),
                source,
            })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ClientError::Unreachable {
                host: self.base.clone(),
                source,
            })?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(body)
            .map_err(|e| ClientError::Protocol(format!("decoding the answer ({status}): {e}")))
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn get_query(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Value, ClientError> {
        self.send(self.request(Method::GET, path).query(query))
            .await
    }

    /// A GET with query parameters, waiting at most `timeout` (a `wait` the server holds).
    pub async fn get_query_timeout(
        &self,
        path: &str,
        query: &[(&str, String)],
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        self.send(
            self.request(Method::GET, path)
                .query(query)
                .timeout(timeout),
        )
        .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    pub async fn post_with_headers(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, String)],
    ) -> Result<Value, ClientError> {
        let mut builder = self.request(Method::POST, path).json(body);
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        self.send(builder).await
    }

    /// Posts raw bytes (a policy component) with query parameters; waits up to `timeout`
    /// (the host compiles the component before it answers).
    pub async fn post_bytes(
        &self,
        path: &str,
        query: &[(&str, String)],
        content_type: &str,
        bytes: Vec<u8>,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        self.send(self.bytes_request(path, query, content_type, bytes, timeout))
            .await
    }

    /// A POST of raw bytes with query parameters, waiting at most `timeout`.
    fn bytes_request(
        &self,
        path: &str,
        query: &[(&str, String)],
        content_type: &str,
        bytes: Vec<u8>,
        timeout: Duration,
    ) -> reqwest::RequestBuilder {
        self.request(Method::POST, path)
            .query(query)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .timeout(timeout)
            .body(bytes)
    }

    /// Posts a policy component asking for its progress (`Accept: text/event-stream`); the
    /// answer, read by the caller, is the event stream (or a JSON answer from a host that
    /// does not stream uploads).
    pub async fn post_bytes_streaming(
        &self,
        path: &str,
        query: &[(&str, String)],
        content_type: &str,
        bytes: Vec<u8>,
        timeout: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        self.checked(
            self.bytes_request(path, query, content_type, bytes, timeout)
                .header(reqwest::header::ACCEPT, "text/event-stream"),
        )
        .await
    }

    /// Posts JSON, waiting at most `timeout` for the answer.
    pub async fn post_timeout(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        self.send(self.request(Method::POST, path).json(body).timeout(timeout))
            .await
    }

    /// Posts JSON with query parameters and headers, waiting at most `timeout` (a submission
    /// that waits for its task); the answer is read by the caller.
    pub async fn post_query_headers_timeout(
        &self,
        path: &str,
        query: &[(&str, String)],
        headers: reqwest::header::HeaderMap,
        body: &Value,
        timeout: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        self.checked(
            self.request(Method::POST, path)
                .query(query)
                .headers(headers)
                .json(body)
                .timeout(timeout),
        )
        .await
    }

    /// A GET whose answer is read as it comes (an event stream, a file): no overall timeout.
    pub async fn get_streaming(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<reqwest::Response, ClientError> {
        // The overall timeout is replaced by a very long one: a followed task may run for days.
        self.checked(
            self.request(Method::GET, path)
                .query(query)
                .timeout(Duration::from_secs(30 * 24 * 3600)),
        )
        .await
    }

    /// Sends a request; an API error becomes [`ClientError::Api`], a success is returned as is.
    async fn checked(&self, builder: RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let response = builder
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                host: self.base.clone(),
                source,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ClientError::Unreachable {
                host: self.base.clone(),
                source,
            })?;
        Err(api_error(status, &bytes))
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.request(Method::DELETE, path)).await
    }
}

fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let field = |name: &str| {
        error
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    ClientError::Api {
        status: status.as_u16(),
        code: field("code").unwrap_or_else(|| "unknown".to_string()),
        message: field("message").unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            if text.trim().is_empty() {
                status.to_string()
            } else {
                text.chars().take(500).collect()
            }
        }),
    }
}
