//! The answers the agent itself gives on an editor stream: a short HTML page
//! for a refused grant or an unreachable Node-RED (the engineer sees it in
//! the browser), and for a request the role may not make, Node-RED's own
//! error shape (JSON with a `message`) to clients that ask for JSON, and the
//! bare sentence to everyone else: the editor's deploy asks for `*/*` and
//! shows the answer's text verbatim ("Deploy failed: ..."). Every text is
//! escaped; nothing here echoes a grant, a token or a header.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use super::Body;

/// A small HTML page: `title` and one `message` sentence.
pub(super) fn page(status: StatusCode, title: &str, message: &str) -> Response<Body> {
    let html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n\
         <body><h1>{title}</h1>\n<p>{message}</p>\n\
         <p><small>tetherd {version}</small></p></body></html>\n",
        title = escape(title),
        message = escape(message),
        version = env!("CARGO_PKG_VERSION"),
    );
    with_body(status, "text/html; charset=utf-8", html.into())
}

/// `403` with `{"error": "forbidden", "message": message}` when the client
/// accepts JSON by name (`accept` is its `Accept` header), else with the
/// message alone as plain text.
pub(super) fn forbidden(message: &str, accept: Option<&header::HeaderValue>) -> Response<Body> {
    let wants_json = accept
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    if !wants_json {
        return with_body(
            StatusCode::FORBIDDEN,
            "text/plain; charset=utf-8",
            Bytes::from(message.to_owned()),
        );
    }
    let json = serde_json::json!({"error": "forbidden", "message": message});
    with_body(
        StatusCode::FORBIDDEN,
        "application/json",
        json.to_string().into(),
    )
}

/// A response with a complete body.
pub(super) fn with_body(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

/// A complete body in the proxy's body type.
pub(super) fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// HTML text escaping.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn text(response: Response<Body>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn pages_escape_what_they_show() {
        let response = page(StatusCode::FORBIDDEN, "Refused", "device '<b>x</b>' & more");
        assert_eq!(
            response.headers()["content-type"],
            "text/html; charset=utf-8"
        );
        let html = text(response).await;
        assert!(
            html.contains("device &#39;&lt;b&gt;x&lt;/b&gt;&#39; &amp; more"),
            "{html}"
        );
    }

    #[tokio::test]
    async fn a_denial_is_node_red_shaped_json_for_json_clients() {
        let accept = header::HeaderValue::from_static("application/json, text/plain, */*");
        let response = forbidden("no \"deploy\"", Some(&accept));
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let json: serde_json::Value = serde_json::from_str(&text(response).await).unwrap();
        assert_eq!(json["error"], "forbidden");
        assert_eq!(json["message"], "no \"deploy\"");
    }

    #[tokio::test]
    async fn a_denial_is_the_bare_sentence_for_the_editors_deploy() {
        let any = header::HeaderValue::from_static("*/*");
        for accept in [Some(&any), None] {
            let response = forbidden("your role (viewer) may not deploy", accept);
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
            assert_eq!(
                response.headers()["content-type"],
                "text/plain; charset=utf-8"
            );
            assert_eq!(text(response).await, "your role (viewer) may not deploy");
        }
    }
}
