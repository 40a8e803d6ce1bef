//! A browser and a fake device for the web and editor tests. The browser
//! keeps one TLS connection (so stream reuse shows), sends cookies and
//! streams bodies. The fake device is a real tunnel with the device's
//! certificate: it opens the control stream (and records what the platform
//! pushes on it), accepts `editor` streams, verifies each grant with the key
//! it pinned at enrollment, and serves HTTP/1.1 with hyper on them, a small
//! handler standing in for the agent and Node-RED.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tether_platform::{Platform, TokenSpec};
use tether_proto::api::{EnrollResponse, Secret};
use tether_proto::control::{ControlDecoder, ControlMessage};
use tether_proto::grant::{GRANT_METADATA_KEY, Grant, Role};
use tether_proto::{ResetCode, Service, ServiceHeader};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::*;

/// A platform for the web tests: `config` with a short shutdown grace,
/// since fake devices keep their control streams open to the end.
pub fn web_config(dir: &std::path::Path) -> tether_platform::PlatformConfig {
    let mut config = config(dir);
    config.shutdown_grace = Duration::from_millis(100);
    config
}

/// Starts a platform with [`web_config`].
pub async fn start_web() -> (Platform, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let platform = Platform::start(web_config(dir.path()))
        .await
        .expect("platform starts");
    (platform, dir)
}

/// A request body the browser sends.
pub type ReqBody = BoxBody<Bytes, Infallible>;

pub fn empty() -> ReqBody {
    Full::new(Bytes::new()).boxed()
}

pub fn bytes(data: impl Into<Bytes>) -> ReqBody {
    Full::new(data.into()).boxed()
}

/// The `Host` the browser sends to the platform, and the matching `Origin`.
pub const HOST: &str = "localhost";
pub const ORIGIN: &str = "https://localhost";

/// One browser connection (keep-alive) to one origin, with an optional
/// cookie.
pub struct Browser {
    sender: SendRequest<ReqBody>,
    pub cookie: Option<String>,
    /// The `Host` it sends: [`HOST`], or a device's editor origin.
    pub host: String,
}

/// The host of device `id`'s editor origin (as [`HOST`], without a port).
pub fn device_host(id: &str) -> String {
    format!("dev-{}.devices.{HOST}", id.strip_prefix("dev_").unwrap())
}

impl Browser {
    pub async fn connect(platform: &Platform, cookie: Option<&str>) -> Browser {
        Browser::connect_to(platform, HOST, cookie).await
    }

    /// A connection that sends `Host: host`.
    pub async fn connect_to(platform: &Platform, host: &str, cookie: Option<&str>) -> Browser {
        Browser::connect_from(platform, host, cookie, None).await
    }

    /// A connection from the loopback address `source` (any if `None`)
    /// that sends `Host: host`.
    pub async fn connect_from(
        platform: &Platform,
        host: &str,
        cookie: Option<&str>,
        source: Option<std::net::IpAddr>,
    ) -> Browser {
        let tls = tls_from(addr(platform), &platform.ca_pem(), None, source)
            .await
            .expect("TLS to the platform");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("HTTP handshake");
        tokio::spawn(conn.with_upgrades());
        Browser {
            sender,
            cookie: cookie.map(str::to_string),
            host: host.to_string(),
        }
    }

    /// `https://HOST`, this connection's origin.
    pub fn origin(&self) -> String {
        format!("https://{}", self.host)
    }

    /// Sends a request and returns the response head with its body unread.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> Response<Incoming> {
        self.sender.ready().await.expect("connection ready");
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.host);
        if let Some(cookie) = &self.cookie {
            request = request.header(header::COOKIE, cookie);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(body).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(request))
            .await
            .expect("an answer within 10 s")
            .expect("the request is answered")
    }

    /// GET, body read whole.
    pub async fn get(&mut self, path: &str) -> Answer {
        collect(self.send(Method::GET, path, &[], empty()).await).await
    }

    /// POST of a form, body read whole.
    pub async fn post_form(&mut self, path: &str, pairs: &[(&str, &str)]) -> Answer {
        let form = encode_form(pairs);
        let origin = self.origin();
        let headers = [
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", origin.as_str()),
        ];
        collect(
            self.send(Method::POST, path, &headers, bytes(form.into_bytes()))
                .await,
        )
        .await
    }
}

pub fn encode_form(pairs: &[(&str, &str)]) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        form.append_pair(name, value);
    }
    form.finish()
}

/// Reads a response's body whole.
pub async fn collect(response: Response<Incoming>) -> Answer {
    let status = response.status();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the body within 10 s")
        .expect("the body")
        .to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn location(&self) -> Option<&str> {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
    }
}

/// The value of the form field `csrf` in a page.
pub fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("no csrf field in {page}"));
    let rest = &page[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

/// The `NAME=value` pair of the cookie `name` an answer sets.
pub fn set_cookie_pair(answer: &Answer, name: &str) -> Option<String> {
    answer
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap().to_string())
        .find(|pair| pair.starts_with(&format!("{name}=")))
}

/// `GET /login` then `POST /login` on a fresh connection, as a browser
/// does: the form's CSRF token and its cookie come from the page.
pub async fn post_login(
    platform: &Platform,
    user: &str,
    password: &str,
    next: Option<&str>,
) -> Answer {
    post_login_from(platform, None, user, password, next).await
}

/// [`post_login`] from the loopback address `source` (any if `None`).
pub async fn post_login_from(
    platform: &Platform,
    source: Option<std::net::IpAddr>,
    user: &str,
    password: &str,
    next: Option<&str>,
) -> Answer {
    let mut browser = Browser::connect_from(platform, HOST, None, source).await;
    let page = browser.get("/login").await;
    assert_eq!(page.status, StatusCode::OK);
    browser.cookie = set_cookie_pair(&page, "__Host-tether_login");
    let csrf = csrf_of(&page.text());
    let mut pairs = vec![("user", user), ("password", password), ("csrf", &csrf)];
    if let Some(next) = next {
        pairs.push(("next", next));
    }
    browser.post_form("/login", &pairs).await
}

/// The `__Host-tether_session=...` pair a login answer sets.
pub fn session_cookie(answer: &Answer) -> String {
    set_cookie_pair(answer, "__Host-tether_session").expect("a session cookie")
}

/// The CSRF token of a session's forms, read from the device list.
pub async fn session_csrf(platform: &Platform, cookie: &str) -> String {
    let index = Browser::connect(platform, Some(cookie))
        .await
        .get("/")
        .await;
    assert_eq!(index.status, StatusCode::OK, "{}", index.text());
    csrf_of(&index.text())
}

/// Follows the platform's handoff into device `id`'s editor origin, as a
/// browser does: `GET /devices/ID/editor{rest}` on the platform, then the
/// handoff on the device's origin. Returns a connection to that origin
/// with its editor cookie, and the path the handoff sent it to.
pub async fn open_editor(
    platform: &Platform,
    cookie: &str,
    id: &str,
    rest: &str,
) -> (Browser, String) {
    let mut browser = Browser::connect(platform, Some(cookie)).await;
    let answer = browser.get(&format!("/devices/{id}/editor{rest}")).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.text());
    let location = answer.location().expect("a handoff location").to_string();
    let prefix = format!("https://{}/__tether/handoff?code=", device_host(id));
    assert!(location.starts_with(&prefix), "{location}");
    let path = &location[format!("https://{}", device_host(id)).len()..];
    let mut editor = Browser::connect_to(platform, &device_host(id), None).await;
    let taken = editor.get(path).await;
    assert_eq!(taken.status, StatusCode::SEE_OTHER, "{}", taken.text());
    editor.cookie =
        Some(set_cookie_pair(&taken, "__Host-tether_editor").expect("an editor cookie"));
    let next = taken.location().expect("where to go").to_string();
    (editor, next)
}

/// The password `login_as` gives a user.
pub fn password_of(name: &str) -> String {
    format!("pw of {name}")
}

/// Creates a user and logs them in; returns the cookie pair.
pub async fn login_as(platform: &Platform, name: &str, team: &str, role: Role) -> String {
    platform
        .add_user(name, team, role, &Secret::new(password_of(name)))
        .await
        .expect("user created");
    let answer = post_login(platform, name, &password_of(name), None).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.text());
    session_cookie(&answer)
}

/// Enrolls a device into `team`.
pub async fn enroll_in(platform: &Platform, team: &str) -> Device {
    let spec = TokenSpec {
        team: team.to_string(),
        ..TokenSpec::default()
    };
    let token = platform.create_token(spec).await.unwrap();
    let key = new_key();
    let answer = post_enroll(
        platform,
        &enroll_request(token.secret().expose(), csr(&key)),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let response: EnrollResponse = serde_json::from_slice(&answer.body).unwrap();
    Device {
        key,
        id: response.device_id.clone(),
        certificate: response.certificate.clone(),
        response,
    }
}

/// What the fake device saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub grant: Grant,
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
}

/// A device played by the test.
pub struct FakeDevice {
    pub device: Device,
    pub tunnel: DeviceTunnel,
    /// Every request served on an editor stream with a valid grant.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Refused grants, with why.
    pub refused: Arc<Mutex<Vec<String>>>,
    /// Messages the platform sent on the control stream.
    pub control: mpsc::UnboundedReceiver<ControlMessage>,
}

impl FakeDevice {
    pub fn id(&self) -> &str {
        &self.device.id
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The next `Protection` push, within 5 s.
    pub async fn next_protection(&mut self) -> bool {
        let wait = async {
            loop {
                match self.control.recv().await {
                    Some(ControlMessage::Protection { enabled }) => return enabled,
                    Some(_) => continue,
                    None => panic!("the control stream ended"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("a protection push within 5 s")
    }
}

/// Enrolls a device into `team` and connects it.
pub async fn fake_device(platform: &Platform, team: &str) -> FakeDevice {
    let device = enroll_in(platform, team).await;
    connect_fake(platform, device).await
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Connects `device`'s tunnel, opens its control stream and serves editor
/// streams.
pub async fn connect_fake(platform: &Platform, device: Device) -> FakeDevice {
    let tunnel = open_tunnel(platform, Some((&device.certificate, &device.key)))
        .await
        .expect("tunnel");
    let mut control = tunnel
        .tunnel
        .open(ServiceHeader::new(Service::Control))
        .unwrap();
    control.accepted().await.expect("control accepted");
    let (tx, control_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut decoder = ControlDecoder::new();
        let mut buf = [0u8; 4096];
        loop {
            match control.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => decoder.push(&buf[..n]),
            }
            while let Ok(Some(message)) = decoder.next_message() {
                let _ = tx.send(message);
            }
        }
    });
    let key = unhex(&device.response.keys.grant);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(Vec::new()));
    let nonces = Arc::new(Mutex::new(HashSet::new()));
    let (device_side, id) = (tunnel.tunnel.clone(), device.id.clone());
    let (seen2, refused2) = (seen.clone(), refused.clone());
    tokio::spawn(async move {
        let only_editor = |header: &ServiceHeader| match header.service {
            Service::Editor => Ok(()),
            ref other => Err((ResetCode::REFUSED, format!("no '{other}' here"))),
        };
        while let Some((stream, header)) = device_side.accept_filtered(only_editor).await {
            let wire = header.get(GRANT_METADATA_KEY).unwrap_or_default();
            let checked = tether_proto::grant::verify(wire, &key, &id, unix_now())
                .map_err(|e| e.to_string())
                .and_then(|grant| {
                    if nonces.lock().unwrap().insert(grant.nonce.clone()) {
                        Ok(grant)
                    } else {
                        Err("replayed".to_string())
                    }
                });
            let grant = match checked {
                Ok(grant) => Some(grant),
                Err(why) => {
                    refused2.lock().unwrap().push(why);
                    None
                }
            };
            let seen = seen2.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let (grant, seen) = (grant.clone(), seen.clone());
                    async move { Ok::<_, Infallible>(editor(req, grant, seen).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    FakeDevice {
        device,
        tunnel,
        seen,
        refused,
        control: control_rx,
    }
}

type DeviceBody = BoxBody<Bytes, hyper::Error>;

fn full(text: impl Into<Bytes>) -> DeviceBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// The device's stand-in editor:
/// - `/slow`: answers after 10 s;
/// - `/upload`: echoes the request body as it arrives;
/// - `/redirect`: 302 to `/target`, with a `Set-Cookie`;
/// - `/comms` (WebSocket): echoes messages;
/// - `/__tether/assets`, the asset manifest: 404, as an agent without one
///   answers (not recorded in `seen`);
/// - anything else: 200 `editor says: <path and query>`.
async fn editor(
    mut req: Request<Incoming>,
    grant: Option<Grant>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Response<DeviceBody> {
    let Some(grant) = grant else {
        let mut response = Response::new(full("bad grant"));
        *response.status_mut() = StatusCode::FORBIDDEN;
        return response;
    };
    let uri = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    if uri == tether_platform::editor_cache::MANIFEST_PATH {
        let mut response = Response::new(full("no manifest"));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    seen.lock().unwrap().push(Seen {
        grant,
        method: req.method().clone(),
        uri: uri.clone(),
        headers: req.headers().clone(),
    });
    match req.uri().path() {
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Response::new(full("late"))
        }
        "/upload" => Response::new(req.into_body().boxed()),
        "/redirect" => Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, "/target")
            .header(
                header::SET_COOKIE,
                "__Host-tether_session=planted; Path=/; Secure",
            )
            .body(full(""))
            .unwrap(),
        // What a compromised device might answer.
        "/hostile" => Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, "//evil.example/")
            .header(header::SET_COOKIE, "planted=1; Domain=localhost; Path=/")
            .header("service-worker-allowed", "/")
            .header("clear-site-data", "\"cookies\"")
            .header("refresh", "0; url=https://evil.example/")
            .header("content-security-policy", "default-src *")
            .header("access-control-allow-origin", "https://localhost")
            .header("access-control-allow-credentials", "true")
            .body(full("hostile"))
            .unwrap(),
        "/comms" => {
            let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
                let mut response = Response::new(full("not a websocket"));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                return response;
            };
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let mut ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, "websocket")
                .header(
                    header::SEC_WEBSOCKET_ACCEPT,
                    derive_accept_key(key.as_bytes()),
                )
                .body(full(""))
                .unwrap()
        }
        _ => Response::new(full(format!("editor says: {uri}"))),
    }
}
