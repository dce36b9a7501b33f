//! The pooled HTTP client the router uses to talk to engines (requests, scrapes, probes).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
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
    /// The connection was refused or could not be made (as opposed to a slow or bad answer).
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Request(String),
    #[error("HTTP {0}")]
    Status(http::StatusCode),
    /// The engine answered with a body over the cap.
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("body: {0}")]
    Body(String),
}

/// GETs `url` and returns its body if it is 2xx, at most `max_bytes` long, and complete within
/// `timeout` (headers and body). Reading stops as soon as the body is known to be too large (by
/// its `Content-Length`, or when the bytes read pass the cap), so a huge or endless answer costs
/// no more than the cap.
pub async fn get(
    client: &HttpClient,
    url: &str,
    timeout: Duration,
    max_bytes: usize,
) -> Result<Bytes, GetError> {
    let uri: http::Uri = url.parse().map_err(|_| GetError::Url(url.to_owned()))?;
    let req = http::Request::get(uri)
        .body(Full::new(Bytes::new()))
        .map_err(|e| GetError::Url(e.to_string()))?;
    let fetch = async {
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
        let announced = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|n| n > max_bytes as u64) {
            return Err(GetError::TooLarge(max_bytes));
        }
        match Limited::new(resp.into_body(), max_bytes).collect().await {
            Ok(b) => Ok(b.to_bytes()),
            Err(e) if e.is::<LengthLimitError>() => Err(GetError::TooLarge(max_bytes)),
            Err(e) => Err(GetError::Body(e.to_string())),
        }
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| GetError::Timeout(timeout))?
}
