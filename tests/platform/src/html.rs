//! The platform's own small HTML pages: one layout, escaping, redirects and
//! the error pages a browser sees (offline device, forbidden, timeout).
//!
//! This module owns the headers every such page carries: `text/html`,
//! `Cache-Control: no-store`, a Content-Security-Policy that allows no
//! script and no external asset, `X-Frame-Options: DENY`, same-origin
//! `Cross-Origin-Opener-Policy` and `Cross-Origin-Resource-Policy`, and
//! `Referrer-Policy: same-origin` (browsers send `Origin: null` on a form post
//! from a `no-referrer` page, which the login form's origin check must refuse).
//! Every value put into a page goes through
//! [`escape`]. It never decides which page to show.

use http::{HeaderValue, Response, StatusCode, header};

use crate::http::{Body, full};

/// The pages' Content-Security-Policy: inline style only, forms to this
/// origin only, nothing else.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:48rem;margin:2rem auto;padding:0 1rem;color:#222}\
table{border-collapse:collapse}td,th{padding:.3rem .8rem;border-bottom:1px solid #ddd;text-align:left}\
.error{color:#a00}.broken{color:#a00;font-weight:bold}.ok{color:#070}.pending{color:#a60}form.inline{display:inline}label{display:block;margin:.5rem 0}";

/// Escapes text for HTML content and double-quoted attribute values.
pub fn escape(text: &str) -> String {
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

/// A page: `title` is escaped here, `body` is HTML the caller built with
/// [`escape`].
pub fn page(status: StatusCode, title: &str, body: &str) -> Response<Body> {
    let title = escape(title);
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title} - Tether</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    );
    let mut response = Response::new(full(html));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // No other origin (a device's editor included) may hold a window
    // reference to these pages or embed them as a resource.
    headers.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// A page with a heading and one paragraph of text (both escaped).
pub fn message(status: StatusCode, title: &str, text: &str) -> Response<Body> {
    let body = format!(
        "<h1>{}</h1>\n<p>{}</p>\n<p><a href=\"/\">Devices</a></p>",
        escape(title),
        escape(text)
    );
    page(status, title, &body)
}

/// A redirect to `location`, a path on this platform.
pub fn redirect(status: StatusCode, location: &str) -> Response<Body> {
    let mut response = Response::new(full(Vec::new()));
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// 303 to `location`.
pub fn see_other(location: &str) -> Response<Body> {
    redirect(StatusCode::SEE_OTHER, location)
}

/// 500, the cause logged by the caller.
pub fn internal() -> Response<Body> {
    message(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Platform error",
        "The platform failed to handle the request; see its log.",
    )
}

/// 429 with `Retry-After`.
pub fn rate_limited(retry_after_secs: u64, text: &str) -> Response<Body> {
    let mut response = message(StatusCode::TOO_MANY_REQUESTS, "Too many attempts", text);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_content_and_attributes() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
