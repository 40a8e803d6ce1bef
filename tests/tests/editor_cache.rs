//! The platform's editor asset cache and the device's gzip, end to end
//! (`docs/protocol.md` §16.7): a real Node-RED behind `tetherd`, whose
//! tunnel crosses a shaping proxy (`tether_e2e::shaper`) that counts the
//! bytes over the device link.
//!
//! - A first engineer's `GET` of an editor file crosses the link (gzip);
//!   a second engineer's, another role in another session, is served from
//!   the platform's cache: the link carries next to nothing.
//! - gzip when the browser accepts it, never when it does not, for cached
//!   files and for answers proxied as they are.
//! - `If-None-Match` with the file's hash: 304 without the device.
//! - Without the editor cookie, a cached file is refused; `/__tether/...`
//!   never reaches a device from a browser; the viewer still only reads.
//! - A device whose files do not hash to what it announced: its answers are
//!   passed on, never stored.
//!
//! Needs Node-RED (`tests/nodered/install.sh`): missing, the test fails when
//! `CI` is set and otherwise skips, saying so loudly.

mod common;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode, header};
use tether_agent::editor::EditorTarget;
use tether_agent::{Agent, AgentOptions, TunnelState};
use tether_e2e::shaper::{Shape, Shaper, route_tunnel};
use tether_e2e::tools;
use tether_e2e::web::{Client, editor_host};
use tether_proto::api::Secret;
use tether_proto::grant::Role;

/// A large script of the editor, announced by every Node-RED 4.
const FILE: &str = "/red/red.min.js";

/// An engineer on a device's editor origin.
struct Engineer {
    client: Client,
    host: String,
    origin: String,
    cookie: String,
}

impl Engineer {
    async fn new(client: &Client, platform_port: u16, device: &str, who: (&str, &str)) -> Engineer {
        let session = client.login(who.0, who.1).await.expect("login");
        let cookie = client
            .editor_cookie(&session, device)
            .await
            .expect("editor handoff");
        let host = editor_host(device, platform_port);
        Engineer {
            client: client.clone(),
            origin: format!("https://{host}"),
            host,
            cookie,
        }
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> tether_e2e::web::Answer {
        let mut all = vec![("cookie", self.cookie.as_str())];
        all.extend_from_slice(headers);
        self.send(Method::GET, path, &all, Bytes::new()).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> tether_e2e::web::Answer {
        let mut conn = self.client.connect().await.expect("connect");
        self.client
            .send(&mut conn, &self.host, method, path, headers, body)
            .await
            .expect("an answer")
    }
}

fn header_text(answer: &tether_e2e::web::Answer, name: header::HeaderName) -> Option<&str> {
    answer.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_engineer_gets_the_editor_files_from_the_platforms_cache() {
    let Some(node_red) = tools::required(tools::node_red().find()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    tools::traversable(dir.path());
    let platform = platform(&dir.path().join("platform")).await;
    add_engineers(&platform).await;
    let port = platform.local_addr().port();
    let link = Shaper::start(platform.local_addr(), Shape::new(0, 1000.0))
        .await
        .unwrap();

    // The device: tetherd launching the real Node-RED, its tunnel over the
    // counted link.
    let state = dir.path().join("device");
    enrolled(&platform, &state).await;
    route_tunnel(&state, port, link.addr().port()).unwrap();
    let (agent, _) = agent_with_node_red(agent_config(&state), &node_red).await;
    let device = agent.device_id();
    let public = tether_agent::editor::assets::public_dir_of(&node_red.display().to_string())
        .expect("the editor client's public folder is found from the command");
    let file = std::fs::read(public.join(FILE.trim_start_matches('/'))).unwrap();

    let client = Client::new(&platform).unwrap();
    let owner = Engineer::new(&client, port, &device, OWNER).await;
    let viewer = Engineer::new(&client, port, &device, VIEWER).await;
    let gzip = [("accept-encoding", "gzip, deflate, br")];

    // The first engineer's load crosses the link (the device, the
    // shaper's client, sends "up"), compressed.
    link.reset_bytes();
    let first = owner.get(FILE, &gzip).await;
    let cold = link.bytes();
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(header_text(&first, header::CONTENT_ENCODING), Some("gzip"));
    assert_eq!(header_text(&first, header::CACHE_CONTROL), Some("no-cache"));
    let etag = header_text(&first, header::ETAG)
        .expect("an ETag")
        .to_string();
    let hash =
        tether_proto::hex::encode(ring::digest::digest(&ring::digest::SHA256, &file).as_ref());
    assert_eq!(etag, format!("\"{hash}\""));
    assert!(
        first.size * 2 < file.len() as u64,
        "gzip: {} of {} bytes",
        first.size,
        file.len()
    );
    assert!(cold.up >= first.size, "the file crossed the link: {cold:?}");
    let (cached_bytes, cached_files) = platform.editor_cache_usage();
    assert!(cached_files >= 1 && cached_bytes >= file.len());

    // The second engineer (another session, the viewer role): from the
    // cache, the link carries next to nothing.
    link.reset_bytes();
    let second = viewer.get(FILE, &gzip).await;
    let warm = link.bytes();
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.size, first.size);
    assert_eq!(header_text(&second, header::ETAG), Some(etag.as_str()));
    assert!(
        warm.total() * 20 < cold.total(),
        "a cached file crossed the link again: {warm:?} against {cold:?} the first time"
    );

    // Not accepted, not compressed: the identity bytes, from the cache.
    link.reset_bytes();
    let plain = viewer.get(FILE, &[]).await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(header_text(&plain, header::CONTENT_ENCODING), None);
    assert_eq!(plain.size, file.len() as u64);
    assert!(link.bytes().total() * 20 < cold.total());

    // Revalidation: 304 without the device.
    link.reset_bytes();
    let again = viewer.get(FILE, &[("if-none-match", etag.as_str())]).await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert_eq!(again.size, 0);
    assert!(link.bytes().total() < 2048, "{:?}", link.bytes());

    // An answer that is not cached is compressed by the device when
    // accepted, and only then.
    let locales = "/locales/editor?lng=en-US";
    let zipped = owner.get(locales, &gzip).await;
    assert_eq!(zipped.status, StatusCode::OK);
    assert_eq!(header_text(&zipped, header::CONTENT_ENCODING), Some("gzip"));
    let unzipped = owner.get(locales, &[]).await;
    assert_eq!(unzipped.status, StatusCode::OK);
    assert_eq!(header_text(&unzipped, header::CONTENT_ENCODING), None);
    assert!(
        zipped.size * 2 < unzipped.size,
        "{} {}",
        zipped.size,
        unzipped.size
    );

    // Without the editor cookie a cached file is refused: a navigation
    // goes back to the platform, anything else gets 401.
    let mut conn = client.connect().await.unwrap();
    let host = editor_host(&device, port);
    let stranger = client
        .send(&mut conn, &host, Method::GET, FILE, &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(stranger.status, StatusCode::SEE_OTHER);
    assert!(stranger.size < 1024, "no file in the refusal");
    let mut conn = client.connect().await.unwrap();
    let script = client
        .send(
            &mut conn,
            &host,
            Method::GET,
            FILE,
            &[("sec-fetch-mode", "no-cors"), ("sec-fetch-dest", "script")],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_ne!(script.status, StatusCode::OK);
    assert!(script.size < 1024, "no file in the refusal");
    let forged = owner
        .send(
            Method::GET,
            FILE,
            &[("cookie", "__Host-tether_editor=forged")],
            Bytes::new(),
        )
        .await;
    assert_ne!(forged.status, StatusCode::OK);

    // The manifest is the platform's to ask for, never a browser's.
    let manifest = owner.get("/__tether/assets", &[]).await;
    assert_eq!(manifest.status, StatusCode::NOT_FOUND);

    // The viewer still only reads.
    let deploy = viewer
        .send(
            Method::POST,
            "/flows",
            &[
                ("cookie", viewer.cookie.as_str()),
                ("origin", viewer.origin.as_str()),
                ("content-type", "application/json"),
            ],
            Bytes::from_static(b"[]"),
        )
        .await;
    assert_eq!(deploy.status, StatusCode::FORBIDDEN, "{}", deploy.text);

    agent.shutdown().await;
    platform.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_does_not_match_its_announcement_is_never_cached() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(&dir.path().join("platform")).await;
    platform
        .add_user(OWNER.0, "default", Role::Owner, &Secret::new(OWNER.1))
        .await
        .unwrap();
    // The device announces `red/x.js` as one content and serves another of
    // the same length.
    let client_dir = dir.path().join("editor-client");
    std::fs::create_dir_all(client_dir.join("public/red")).unwrap();
    std::fs::write(client_dir.join("package.json"), br#"{"version":"4.1.0"}"#).unwrap();
    let announced = "console.log('announced');".repeat(100);
    let served = "console.log('different');".repeat(100);
    assert_eq!(announced.len(), served.len());
    std::fs::write(client_dir.join("public/red/x.js"), &announced).unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    let editor = http_stand_in(move |path| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match path {
            "/red/x.js" => (
                "200 OK",
                "Content-Type: application/javascript\r\n".into(),
                served.clone(),
            ),
            _ => ("404 Not Found", String::new(), "no".into()),
        }
    })
    .await;
    let state = dir.path().join("device");
    enrolled(&platform, &state).await;
    let options = AgentOptions {
        editor: Some(EditorTarget {
            addr: editor,
            assets: Some(client_dir.join("public")),
            ..EditorTarget::default()
        }),
    };
    let agent = Agent::start_with(agent_config(&state), options)
        .await
        .expect("agent starts");
    let device = agent.device_id();
    wait_status(&agent, "connected", |s| s.state == TunnelState::Connected).await;

    let client = Client::new(&platform).unwrap();
    let owner = Engineer::new(&client, platform.local_addr().port(), &device, OWNER).await;
    for round in 1..=3 {
        for encoding in ["gzip", "identity"] {
            let answer = owner
                .get("/red/x.js", &[("accept-encoding", encoding)])
                .await;
            assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
            assert_ne!(
                header_text(&answer, header::CACHE_CONTROL),
                Some("no-cache"),
                "not an answer from the cache"
            );
            if encoding == "identity" {
                assert!(
                    answer.text.contains("different"),
                    "the device's bytes are passed on"
                );
            }
        }
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            round * 2,
            "every request reached the device"
        );
    }
    assert_eq!(platform.editor_cache_usage(), (0, 0), "nothing was stored");
    agent.shutdown().await;
    platform.shutdown().await;
}
