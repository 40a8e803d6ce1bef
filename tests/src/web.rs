//! A browser's side of the platform's web pages and editor origins, for
//! end-to-end tests and benchmarks: TLS trusting the platform's CA, one
//! HTTP/1.1 connection per [`Client::connect`], the login form with its
//! CSRF token and cookie, and the handoff into a device's editor origin
//! (`https://dev-HEX.devices.localhost:PORT`, reached on the platform's
//! address with that `Host`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tether_platform::Platform;
use tokio::net::TcpStream;

/// TLS and HTTP/1.1 to the platform, as a browser does (trusting its CA).
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    /// The platform's own `Host`: `localhost:PORT`.
    pub host: String,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

pub type Conn = SendRequest<Full<Bytes>>;

/// The `Host` of device `device`'s editor origin.
pub fn editor_host(device: &str, port: u16) -> String {
    let label = device.strip_prefix("dev_").unwrap_or(device);
    format!("dev-{label}.devices.localhost:{port}")
}

impl Client {
    pub fn new(platform: &Platform) -> Result<Client> {
        let addr: SocketAddr = platform.local_addr();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(
            platform.ca_pem().as_bytes(),
        )?)?;
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Client {
            addr,
            host: format!("localhost:{}", addr.port()),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    pub async fn tls(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        Ok(self
            .tls
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?)
    }

    pub async fn connect(&self) -> Result<Conn> {
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(self.tls().await?)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// A request on `conn` to `host`; the status, the `Set-Cookie` pair,
    /// the `Location` and the body.
    pub async fn send(
        &self,
        conn: &mut Conn,
        host: &str,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer> {
        conn.ready().await?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = conn.send_request(request.body(Full::new(body))?).await?;
        let status = response.status();
        let header_text = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let cookie =
            header_text(header::SET_COOKIE).and_then(|v| v.split(';').next().map(str::to_string));
        let location = header_text(header::LOCATION);
        let headers = response.headers().clone();
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        let mut size = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                size += data.len() as u64;
                if bytes.len() < 64 * 1024 {
                    bytes.extend_from_slice(&data);
                }
            }
        }
        Ok(Answer {
            status,
            cookie,
            location,
            headers,
            size,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// Logs `user` in on a fresh connection, as a browser does (the login
    /// page first, for its CSRF token and cookie); the session cookie pair.
    pub async fn login(&self, user: &str, password: &str) -> Result<String> {
        let mut conn = self.connect().await?;
        let page = self
            .send(
                &mut conn,
                &self.host,
                Method::GET,
                "/login",
                &[],
                Bytes::new(),
            )
            .await?;
        let login_cookie = page.cookie.context("the login page set no cookie")?;
        let csrf = page
            .text
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .context("the login page has no CSRF token")?
            .to_string();
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("user", user);
        form.append_pair("password", password);
        form.append_pair("csrf", &csrf);
        let origin = format!("https://{}", self.host);
        let answer = self
            .send(
                &mut conn,
                &self.host,
                Method::POST,
                "/login",
                &[
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("origin", &origin),
                    ("cookie", &login_cookie),
                ],
                Bytes::from(form.finish()),
            )
            .await?;
        ensure!(
            answer.status == StatusCode::SEE_OTHER,
            "login answered {}",
            answer.status
        );
        answer.cookie.context("the login set no cookie")
    }

    /// The handoff into `device`'s editor origin for the session `cookie`:
    /// the editor cookie pair.
    pub async fn editor_cookie(&self, cookie: &str, device: &str) -> Result<String> {
        let mut conn = self.connect().await?;
        let path = format!("/devices/{device}/editor/");
        let answer = self
            .send(
                &mut conn,
                &self.host,
                Method::GET,
                &path,
                &[("cookie", cookie)],
                Bytes::new(),
            )
            .await?;
        let location = answer.location.context("the platform did not hand over")?;
        let editor = editor_host(device, self.addr.port());
        let handoff = location
            .strip_prefix(&format!("https://{editor}"))
            .context("the handoff leads elsewhere")?
            .to_string();
        let mut conn = self.connect().await?;
        let taken = self
            .send(&mut conn, &editor, Method::GET, &handoff, &[], Bytes::new())
            .await?;
        taken.cookie.context("the handoff set no editor cookie")
    }
}

/// One answer, read whole (its first 64 KiB kept as text).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// The `NAME=value` pair of the first `Set-Cookie`.
    pub cookie: Option<String>,
    pub location: Option<String>,
    pub headers: http::HeaderMap,
    /// Body bytes.
    pub size: u64,
    /// The body's first 64 KiB, as text.
    pub text: String,
}
