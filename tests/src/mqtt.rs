//! An MQTT 5 client of a broker, as a flow would be, for the bridge's tests
//! and `tether-mqtt-bench`: subscribes to its filters on every ConnAck and
//! hands over what arrives.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

/// A connected client; what arrives on its subscriptions comes out of `rx`.
#[derive(Debug)]
pub struct Client {
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Publish>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client `id` of the broker on 127.0.0.1:`port`, connected and with
/// every filter acknowledged (within 10 s).
pub async fn client(port: u16, id: &str, filters: &[String]) -> Result<Client> {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_outgoing_inflight_upper_limit(1000)
        .set_receive_maximum(Some(1000));
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    let (client, mut events) = AsyncClient::new(options, 10_000);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    let sub = client.clone();
    let filters = filters.to_vec();
    let want = filters.len().max(1);
    let task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for f in &filters {
                        let _ = sub.subscribe(f.clone(), QoS::AtLeastOnce).await;
                    }
                    if filters.is_empty() {
                        let _ = ready_tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    for _ in 0..want {
        tokio::time::timeout(Duration::from_secs(10), ready.recv())
            .await
            .context("an MQTT client did not connect and subscribe within 10 s")?;
    }
    Ok(Client { client, rx, task })
}

/// A broker in a process of its own on 127.0.0.1, stopped when dropped.
#[derive(Debug)]
pub struct Broker {
    child: std::process::Child,
    pub port: u16,
}

impl Broker {
    /// The broker's process id (for CPU figures).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `command` (a broker that will listen on `port`) and waits
    /// until the port accepts connections (10 s at most).
    pub async fn spawn(mut command: std::process::Command, port: u16) -> Result<Broker> {
        let program = command.get_program().to_string_lossy().into_owned();
        let child = command
            .spawn()
            .with_context(|| format!("cannot start '{program}'"))?;
        let mut broker = Broker { child, port };
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(broker);
            }
            if let Ok(Some(status)) = broker.child.try_wait() {
                anyhow::bail!("'{program}' exited ({status}) before listening on {port}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        broker.stop();
        anyhow::bail!("'{program}' did not listen on {port} within 10 s")
    }

    /// Debian's mosquitto on a free port of 127.0.0.1, with its config
    /// (`dir/NAME.conf`: anonymous clients, `extra` lines after the
    /// listener's, so they apply to it) and its log (`dir/NAME.log`).
    pub async fn mosquitto(dir: &Path, name: &str, extra: &str) -> Result<Broker> {
        // The free port may be taken by another test's process before
        // mosquitto binds it: then it exits, and a new port is tried.
        let mut failed = None;
        for _ in 0..3 {
            let port = crate::bench::free_port()?;
            let conf = dir.join(format!("{name}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "per_listener_settings false\nset_tcp_nodelay true\nallow_anonymous true\nmax_queued_messages 200000\nmax_inflight_messages 1000\nlistener {port} 127.0.0.1\n{extra}"
                ),
            )?;
            let log_path = dir.join(format!("{name}.log"));
            let log = std::fs::File::create(&log_path)?;
            let mut command = std::process::Command::new("mosquitto");
            command
                .arg("-c")
                .arg(&conf)
                .stdout(log.try_clone()?)
                .stderr(log);
            match Broker::spawn(command, port).await {
                Ok(broker) => return Ok(broker),
                Err(e) => {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    failed = Some(e.context(format!("mosquitto's log: {}", log.trim())));
                }
            }
        }
        Err(failed
            .unwrap_or_else(|| anyhow::anyhow!("no attempt"))
            .context("mosquitto did not start (apt-get install mosquitto)"))
    }

    /// Stops the broker (its sessions are gone with it).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The connection options of the mosquitto command-line clients: MQTT 5,
/// QoS 1, the broker on 127.0.0.1:`port`, then `extra` (`--cafile`...).
fn cli_args(port: u16, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = ["-V", "mqttv5", "-q", "1", "-h", "127.0.0.1", "-p"]
        .into_iter()
        .map(String::from)
        .collect();
    args.push(port.to_string());
    args.extend_from_slice(extra);
    args
}

/// A `mosquitto_sub` process subscribed to a filter; each message it
/// prints is one line `MSG TOPIC PAYLOAD`.
#[derive(Debug)]
pub struct Sub {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

/// Marks the lines of `mosquitto_sub` that are messages (the others are its
/// debug output).
const SUB_MARK: &str = "MSG ";

impl Sub {
    /// `mosquitto_sub -V mqttv5 -q 1 -t FILTER` on 127.0.0.1:`port` (with
    /// `extra` options), once its subscription is acknowledged (10 s).
    pub async fn start(port: u16, filter: &str, extra: &[String]) -> Result<Sub> {
        use tokio::io::AsyncBufReadExt;
        // Line-buffered: its output goes to a pipe, which stdio would
        // otherwise hold until its buffer fills.
        let mut child = tokio::process::Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(cli_args(port, extra))
            .args(["-d", "-t", filter, "-F"])
            .arg(format!("{SUB_MARK}%t %p"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start mosquitto_sub (apt-get install mosquitto-clients)")?;
        let stdout = child.stdout.take().context("mosquitto_sub's stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let subscribed = async {
            while let Some(line) = lines.next_line().await? {
                if line.contains("received SUBACK") {
                    return Ok(());
                }
            }
            anyhow::bail!("mosquitto_sub exited before its subscription was acknowledged")
        };
        tokio::time::timeout(Duration::from_secs(10), subscribed)
            .await
            .context("mosquitto_sub was not subscribed within 10 s")??;
        Ok(Sub { child, lines })
    }

    /// The next message as `(topic, payload)`, or `None` if none came
    /// within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Result<Option<(String, String)>> {
        let next = async {
            while let Some(line) = self.lines.next_line().await? {
                if let Some((topic, payload)) =
                    line.strip_prefix(SUB_MARK).and_then(|m| m.split_once(' '))
                {
                    return Ok((topic.to_owned(), payload.to_owned()));
                }
            }
            anyhow::bail!("mosquitto_sub exited")
        };
        match tokio::time::timeout(wait, next).await {
            Ok(got) => got.map(Some),
            Err(_) => Ok(None),
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// `mosquitto_pub -V mqttv5 -q 1 -t TOPIC -m PAYLOAD` on 127.0.0.1:`port`
/// (with `extra` options); done once the broker acknowledged it.
pub async fn publish(port: u16, topic: &str, payload: &str, extra: &[String]) -> Result<()> {
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(cli_args(port, extra))
        .args(["-t", topic, "-m", payload])
        .output()
        .await
        .context("cannot run mosquitto_pub (apt-get install mosquitto-clients)")?;
    anyhow::ensure!(
        out.status.success(),
        "mosquitto_pub on {port} '{topic}' failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A CA (`ca.pem`) and two certificates for `localhost` and 127.0.0.1 it
/// signed (`server.pem`/`.key`, `client.pem`/`.key`), as PEM files in `dir`.
pub fn tls_files(dir: &Path) -> Result<()> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    for name in ["server", "client"] {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("test {name}"));
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse()?));
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
    }
    Ok(())
}
