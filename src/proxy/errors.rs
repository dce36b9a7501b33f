//! OpenAI-shaped JSON errors: `{"error": {"message", "type", "param", "code"}}`.

use crate::admit::queue::Refused;
use crate::admit::rate_limit::Limited;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use super::body::{BodyReadError, RouterBody};

/// Everything the router itself can answer with instead of an engine's response.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("Not found: {0}")]
    RouteNotFound(String),
    #[error("Method {0} is not allowed on {1}")]
    MethodNotAllowed(String, String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("Request body exceeds the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("The request body stalled: no byte received for {0:?}")]
    RequestTimeout(Duration),
    #[error("No healthy engine serves model `{0}`; retry later")]
    NoHealthyEngine(String, Duration),
    #[error("{0}")]
    BadGateway(String),
    #[error("The engine did not answer within {0:?}")]
    GatewayTimeout(Duration),
    /// Past a rate limit: OpenAI's 429, its body and headers.
    #[error("{}", .0.message())]
    RateLimited(Box<Limited>),
    /// Refused by the router's queue (`--engine-queue-limit`): 429, or 503 past the queue
    /// timeout.
    #[error("{0}; retry later")]
    Queue(Refused),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(..) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::NoHealthyEngine(..) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::RateLimited(l) => l.status(),
            ApiError::Queue(Refused::TimedOut) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Queue(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn kind_and_code(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::BadRequest(_) => ("invalid_request_error", "invalid_request"),
            ApiError::ModelNotFound(_) => ("invalid_request_error", "model_not_found"),
            ApiError::RouteNotFound(_) => ("invalid_request_error", "not_found"),
            ApiError::MethodNotAllowed(..) => ("invalid_request_error", "method_not_allowed"),
            ApiError::Unauthorized(_) => ("invalid_request_error", "invalid_api_key"),
            ApiError::PayloadTooLarge(_) => ("invalid_request_error", "payload_too_large"),
            ApiError::RequestTimeout(_) => ("invalid_request_error", "request_timeout"),
            ApiError::NoHealthyEngine(..) => ("service_unavailable", "no_healthy_engine"),
            ApiError::BadGateway(_) => ("api_error", "bad_gateway"),
            ApiError::GatewayTimeout(_) => ("api_error", "gateway_timeout"),
            ApiError::RateLimited(l) => (l.which.as_str(), "rate_limit_exceeded"),
            ApiError::Queue(r) => ("overloaded", r.code()),
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> Bytes {
        if let ApiError::RateLimited(l) = self {
            return l.error_body();
        }
        let (kind, code) = self.kind_and_code();
        let v = serde_json::json!({
            "error": { "message": self.to_string(), "type": kind, "param": null, "code": code }
        });
        Bytes::from(v.to_string())
    }

    /// Whether an HTTP/1 connection must be closed after this answer: the rest of a stalled
    /// request body may still come, and would be read as the next request.
    pub fn closes_connection(&self) -> bool {
        matches!(self, ApiError::RequestTimeout(_))
    }

    pub fn into_response(self) -> Response<RouterBody> {
        let mut resp = Response::new(RouterBody::full(self.body()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match &self {
            ApiError::NoHealthyEngine(_, after) => {
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(after.as_secs().max(1)),
                );
            }
            ApiError::Queue(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized(_) => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RateLimited(l) => {
                for (name, value) in &l.header_map() {
                    h.insert(name.clone(), value.clone());
                }
            }
            _ => {}
        }
        resp
    }
}

/// The longest client-supplied name (a model, a path) echoed in an error message, in characters.
pub const MAX_ECHOED_CHARS: usize = 256;

/// `s` cut to [`MAX_ECHOED_CHARS`] characters, marked with `…` when cut.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHOED_CHARS) {
        None => s.to_owned(),
        Some((at, _)) => format!("{}…", &s[..at]),
    }
}

impl From<BodyReadError> for ApiError {
    fn from(e: BodyReadError) -> ApiError {
        match e {
            BodyReadError::TooLarge(limit) => ApiError::PayloadTooLarge(limit),
            BodyReadError::Stalled(idle) => ApiError::RequestTimeout(idle),
            e @ BodyReadError::Broken(_) => ApiError::BadRequest(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_openai_shaped() {
        let e = ApiError::ModelNotFound("x".into());
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("`x`"));
        let r = ApiError::NoHealthyEngine("m".into(), Duration::from_secs(1)).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let e = ApiError::RequestTimeout(Duration::from_secs(30));
        assert!(e.closes_connection());
        assert_eq!(e.status(), StatusCode::REQUEST_TIMEOUT);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "request_timeout");
        for (refused, status, code) in [
            (Refused::Shed, 429, "request_shed"),
            (Refused::Full, 429, "queue_full"),
            (Refused::Displaced, 429, "queue_displaced"),
            (Refused::TimedOut, 503, "queue_timeout"),
        ] {
            let r = ApiError::Queue(refused).into_response();
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.headers()[header::RETRY_AFTER], "1");
            let v: serde_json::Value =
                serde_json::from_slice(&ApiError::Queue(refused).body()).unwrap();
            assert_eq!(v["error"]["code"], code);
            assert_eq!(v["error"]["type"], "overloaded");
        }
        let e = ApiError::GatewayTimeout(Duration::from_secs(1));
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "gateway_timeout");
    }

    #[test]
    fn echoed_names_are_clipped_at_a_char_boundary() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(1000);
        let c = clip(&long);
        assert_eq!(c.chars().count(), MAX_ECHOED_CHARS + 1);
        assert!(c.ends_with('…'));
    }
}
