//! gzip of Node-RED's answers before they cross the device link
//! (`docs/protocol.md` §16.7).
//!
//! Node-RED serves the editor's scripts, styles and JSON uncompressed; on a
//! cellular link those bytes are most of an editor load. When the request
//! accepts gzip and the answer is a `200` of a compressible type (text,
//! JavaScript, JSON, CSS, SVG, XML) with no `Content-Encoding` of its own,
//! no `Content-Range` and at least [`MIN_SIZE`] bytes (or no length given),
//! the body is compressed as it streams: each chunk from Node-RED goes
//! through the encoder and what comes out is sent on. `Content-Encoding:
//! gzip` is set, `Content-Length` dropped, `Vary: Accept-Encoding` added and
//! a strong `ETag` made weak (the bytes differ, the resource does not).
//!
//! Bounds: one encoder (its window and tables, about 300 KiB) per answer
//! being compressed, at most [`MAX_ENCODERS`] at once for the whole agent;
//! when all are busy the answer goes uncompressed rather than waiting. The
//! encoder's output buffer holds what one input chunk (at most the proxy's
//! 32 KiB read buffer) produced. This module never buffers a whole body and
//! never changes what the body decodes to.

use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Body, BoxError};
pub use tether_proto::editor_headers::accepts_gzip;

/// Smaller answers are sent as they are: gzip's header and trailer would
/// eat most of the gain.
pub const MIN_SIZE: u64 = 1024;
/// Answers compressed at once across every editor stream.
pub const MAX_ENCODERS: usize = 8;
/// zlib level 6: most of the gain of 9 at about a third of its CPU.
const LEVEL: u32 = 6;

/// The agent's encoders: a permit per answer being compressed.
#[derive(Debug, Clone)]
pub struct Encoders(Arc<Semaphore>);

impl Default for Encoders {
    fn default() -> Self {
        Encoders(Arc::new(Semaphore::new(MAX_ENCODERS)))
    }
}

/// True for the media types worth compressing.
pub fn compressible(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence.starts_with("text/")
        || essence.ends_with("javascript")
        || essence.ends_with("json")
        || essence.ends_with("+xml")
        || essence.ends_with("/xml")
        || essence == "image/svg+xml"
        || essence == "application/wasm"
}

/// Whether an answer to `method` with `status` and `headers` should be
/// compressed for a client that accepts gzip.
fn worth_it(method: &Method, status: StatusCode, headers: &HeaderMap) -> bool {
    if *method == Method::HEAD || status != StatusCode::OK {
        return false;
    }
    if headers.contains_key(header::CONTENT_ENCODING) || headers.contains_key(header::CONTENT_RANGE)
    {
        return false;
    }
    let typed = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(compressible);
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    typed && length.is_none_or(|len| len >= MIN_SIZE)
}

impl Encoders {
    /// `response` compressed if the client accepts gzip and it is worth it
    /// and an encoder is free; otherwise unchanged.
    pub fn apply(
        &self,
        accepts: bool,
        method: &Method,
        response: Response<Body>,
    ) -> Response<Body> {
        if !accepts || !worth_it(method, response.status(), response.headers()) {
            return response;
        }
        let Ok(permit) = self.0.clone().try_acquire_owned() else {
            return response;
        };
        let (mut parts, body) = response.into_parts();
        let headers = &mut parts.headers;
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
        if let Some(etag) = headers.get(header::ETAG)
            && !etag.as_bytes().starts_with(b"W/")
        {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(etag.as_bytes());
            match HeaderValue::from_bytes(&weak) {
                Ok(weak) => headers.insert(header::ETAG, weak),
                Err(_) => headers.remove(header::ETAG),
            };
        }
        let gzip = Gzip {
            body,
            encoder: Some(GzEncoder::new(Vec::new(), Compression::new(LEVEL))),
            _permit: permit,
        };
        Response::from_parts(parts, gzip.boxed())
    }
}

/// A body compressed as it streams. Trailers are dropped (gzip has none and
/// Node-RED sends none).
struct Gzip {
    body: Body,
    /// `None` once the gzip trailer went out.
    encoder: Option<GzEncoder<Vec<u8>>>,
    /// Released when the body is done or dropped.
    _permit: OwnedSemaphorePermit,
}

impl HttpBody for Gzip {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(encoder) = this.encoder.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    encoder.write_all(&data)?;
                    let out = std::mem::take(encoder.get_mut());
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out.into()))));
                    }
                }
                Some(Err(e)) => {
                    this.encoder = None;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    let Some(encoder) = this.encoder.take() else {
                        return Poll::Ready(None);
                    };
                    let out = encoder.finish()?;
                    return Poll::Ready(Some(Ok(Frame::data(out.into()))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn only_compressible_full_answers_of_some_size_are_compressed() {
        let js = [("content-type", "application/javascript; charset=UTF-8")];
        let ok = |pairs: &[(&str, &str)]| worth_it(&Method::GET, StatusCode::OK, &headers(pairs));
        assert!(ok(&js));
        assert!(ok(&[
            ("content-type", "text/css"),
            ("content-length", "2048")
        ]));
        assert!(ok(&[("content-type", "application/json")]));
        assert!(ok(&[("content-type", "image/svg+xml")]));
        assert!(!ok(&[
            ("content-type", "text/css"),
            ("content-length", "1023")
        ]));
        assert!(!ok(&[("content-type", "font/woff2")]));
        assert!(!ok(&[("content-type", "image/png")]));
        assert!(!ok(&[]));
        assert!(!ok(&[
            ("content-type", "text/html"),
            ("content-encoding", "br")
        ]));
        assert!(!ok(&[
            ("content-type", "text/html"),
            ("content-range", "bytes 0-9/100")
        ]));
        assert!(!worth_it(&Method::HEAD, StatusCode::OK, &headers(&js)));
        assert!(!worth_it(
            &Method::GET,
            StatusCode::NOT_MODIFIED,
            &headers(&js)
        ));
        assert!(!worth_it(
            &Method::GET,
            StatusCode::PARTIAL_CONTENT,
            &headers(&js)
        ));
    }

    #[tokio::test]
    async fn a_streamed_body_decodes_to_what_node_red_sent() {
        let chunks: Vec<Bytes> = (0..40u32)
            .map(|i| Bytes::from(format!("function f{i}() {{ return {i}; }}\n").repeat(200)))
            .collect();
        let original: Vec<u8> = chunks.concat();
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, BoxError>(Frame::data(c))),
        );
        let body = http_body_util::StreamBody::new(stream).boxed();
        let mut response = Response::new(body);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/javascript"),
        );
        response
            .headers_mut()
            .insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        let encoders = Encoders::default();
        let gzipped = encoders.apply(true, &Method::GET, response);
        assert_eq!(gzipped.headers()[header::CONTENT_ENCODING], "gzip");
        assert_eq!(gzipped.headers()[header::VARY], "accept-encoding");
        assert_eq!(gzipped.headers()[header::ETAG], "W/\"abc\"");
        assert_eq!(encoders.0.available_permits(), MAX_ENCODERS - 1);
        let compressed = gzipped.into_body().collect().await.unwrap().to_bytes();
        assert!(
            compressed.len() * 10 < original.len(),
            "{}",
            compressed.len()
        );
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, original);
        assert_eq!(encoders.0.available_permits(), MAX_ENCODERS);
    }

    #[test]
    fn with_every_encoder_busy_answers_go_uncompressed() {
        let encoders = Encoders::default();
        let held: Vec<_> = (0..MAX_ENCODERS)
            .map(|_| encoders.0.clone().try_acquire_owned().unwrap())
            .collect();
        let mut response = Response::new(super::super::reply::full(Bytes::from(vec![b'a'; 4096])));
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/css"));
        let answer = encoders.apply(true, &Method::GET, response);
        assert!(!answer.headers().contains_key(header::CONTENT_ENCODING));
        drop(held);
    }
}
