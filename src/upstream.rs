//! The pooled HTTP client the router uses to talk to engines (requests, scrapes, probes).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// The client type: HTTP/1.1 to engines, pooled, TCP_NODELAY.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Builds the shared client.
pub fn build_client(connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(30)));
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(4096)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// Why a small GET to an engine failed.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("bad url {0}")]
    Url(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Request(String),
    #[error("HTTP {0}")]
    Status(http::StatusCode),
    #[error("body: {0}")]
    Body(String),
}

/// GETs `url` and returns its body, bounded by `timeout` overall (headers and body).
pub async fn get(client: &HttpClient, url: &str, timeout: Duration) -> Result<Bytes, GetError> {
    let uri: http::Uri = url.parse().map_err(|_| GetError::Url(url.to_owned()))?;
    let req = http::Request::get(uri)
        .body(Full::new(Bytes::new()))
        .map_err(|e| GetError::Url(e.to_string()))?;
    let fut = async {
        let resp = client.request(req).await.map_err(|e| {
            if e.is_connect() {
                GetError::Connect(e.to_string())
            } else {
                GetError::Request(e.to_string())
            }
        })?;
        if !resp.status().is_success() {
            return Err(GetError::Status(resp.status()));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| GetError::Body(e.to_string()))?;
        Ok(body.to_bytes())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| GetError::Timeout(timeout))?
}
