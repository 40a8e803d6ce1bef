//! Small helpers shared by the HTTPS handlers: the body type, JSON answers,
//! `ApiError` answers and bounded body reads.
//!
//! This module owns the shape of every answer the platform sends, so each
//! error is an [`ApiError`] with a code and one sentence for a person. It
//! never decides which error applies.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tether_proto::api::{ApiError, ErrorCode};

/// The body type of every answer: boxed, so an answer made here in full and
/// a body streamed from a device through the editor proxy have one type.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A body of `bytes`, sent whole.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A JSON answer.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => with_type(status, bytes),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "the answer could not be encoded",
        ),
    }
}

/// An `ApiError` answer.
pub fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response<Body> {
    let body = ApiError {
        error: code,
        message: message.into(),
    };
    // An ApiError always encodes; fall back to an empty body rather than
    // panic if it ever did not.
    with_type(status, serde_json::to_vec(&body).unwrap_or_default())
}

/// 429 with `Retry-After`.
pub fn rate_limited(retry_after_secs: u64, message: &str) -> Response<Body> {
    let mut response = error(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::RateLimited,
        message,
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    response
}

/// 404 for routes that do not exist.
pub fn not_found() -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such endpoint",
    )
}

/// 500; the cause is logged by the caller, never sent.
pub fn internal() -> Response<Body> {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        "the platform failed to handle the request; see its log",
    )
}

/// Reads a JSON body of at most `limit` bytes. On failure, the answer to
/// send (400 bad_request).
pub async fn read_json<T: DeserializeOwned>(
    body: Incoming,
    limit: usize,
) -> Result<T, Response<Body>> {
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let message =
                format!("the request body could not be read or is larger than {limit} bytes");
            return Err(error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                message,
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        let message = format!("the request body is not the expected JSON: {e}");
        error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    })
}

/// An empty answer with `status`, for upgrades.
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::default());
    *response.status_mut() = status;
    response
}

/// True if the request asks to upgrade to `protocol` (`Connection: upgrade`
/// and `Upgrade: <protocol>`, case-insensitive).
pub fn wants_upgrade(headers: &http::HeaderMap, protocol: &str) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, protocol)
}

fn with_type(status: StatusCode, bytes: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
