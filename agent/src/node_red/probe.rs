//! Whether the local Node-RED runs the flows it was given: it answers, its
//! admin API holds as many nodes as the flows file, and every node type the
//! flows use is installed (Node-RED answers with missing types too, its
//! flows stopped; only this tells).
//!
//! The probe asks with a short-lived token of its own (`flows.read`), never
//! proxies anything and never changes Node-RED's state.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::token::{LocalAuth, Permissions};

/// The most the probe reads of an answer.
const MAX_ANSWER: usize = 32 * 1024 * 1024;
/// One request's time limit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The name the probe's tokens carry, in Node-RED's audit log.
const PROBE_USER: &str = "tetherd-health";

/// Node "types" that are structure, not installed node types.
const STRUCTURE: &[&str] = &["tab", "subflow", "group", "junction"];

/// What a flows file should look like once Node-RED runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    /// Entries in the flows file (tabs, nodes, config nodes...).
    pub entries: usize,
    /// The node types it uses.
    pub types: BTreeSet<String>,
}

impl Expect {
    /// From a flows file's bytes: a JSON array of objects with a `type`.
    pub fn from_flows(bytes: &[u8]) -> Result<Expect, String> {
        let flows: Vec<serde_json::Value> = serde_json::from_slice(bytes)
            .map_err(|e| format!("flows.json is not a JSON array of nodes: {e}"))?;
        let mut types = BTreeSet::new();
        for node in &flows {
            let Some(kind) = node.get("type").and_then(|t| t.as_str()) else {
                return Err("flows.json has an entry without a type".into());
            };
            if !STRUCTURE.contains(&kind) && !kind.starts_with("subflow:") {
                types.insert(kind.to_owned());
            }
        }
        Ok(Expect {
            entries: flows.len(),
            types,
        })
    }
}

/// Checks once; `Err` says, for a person, what is not right yet.
pub async fn flows_running(
    addr: SocketAddr,
    auth: &LocalAuth,
    expect: &Expect,
) -> Result<(), String> {
    let token = auth.token(
        PROBE_USER,
        &Permissions::from_list(&["flows.read", "nodes.read"]),
    );
    let flows = get_json(addr, "/flows", &token, &[("Node-RED-API-Version", "v1")]).await?;
    let count = flows
        .as_array()
        .map(Vec::len)
        .ok_or("GET /flows did not answer a list")?;
    if count != expect.entries {
        return Err(format!(
            "Node-RED runs {count} flow entries where the snapshot has {}",
            expect.entries
        ));
    }
    let nodes = get_json(addr, "/nodes", &token, &[("Accept", "application/json")]).await?;
    let installed: BTreeSet<&str> = nodes
        .as_array()
        .ok_or("GET /nodes did not answer a list")?
        .iter()
        .filter(|set| set.get("enabled").and_then(|e| e.as_bool()) != Some(false))
        .filter_map(|set| set.get("types").and_then(|t| t.as_array()))
        .flatten()
        .filter_map(|t| t.as_str())
        .collect();
    let missing: Vec<&str> = expect
        .types
        .iter()
        .map(String::as_str)
        .filter(|t| !installed.contains(t))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the flows use node types that are not installed, so they did not start: {}",
            missing.join(", ")
        ));
    }
    Ok(())
}

async fn get_json(
    addr: SocketAddr,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> Result<serde_json::Value, String> {
    tokio::time::timeout(REQUEST_TIMEOUT, get(addr, path, token, headers))
        .await
        .map_err(|_| format!("GET {path} not answered within {REQUEST_TIMEOUT:?}"))?
}

async fn get(
    addr: SocketAddr,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> Result<serde_json::Value, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("Node-RED does not answer on {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .header(super::TOKEN_HEADER, token);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("GET {path}: {e}"))?
        .to_bytes();
    conn.abort();
    if !status.is_success() {
        return Err(format!("GET {path} answered {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("GET {path}: not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flows_file_gives_its_entries_and_node_types() {
        let flows = br#"[{"id":"t","type":"tab"},{"id":"a","type":"http in","z":"t"},
            {"id":"b","type":"subflow:s1","z":"t"},{"id":"s1","type":"subflow"},
            {"id":"c","type":"http response","z":"t"},{"id":"d","type":"http in","z":"t"}]"#;
        let expect = Expect::from_flows(flows).unwrap();
        assert_eq!(expect.entries, 6);
        assert_eq!(
            expect.types.into_iter().collect::<Vec<_>>(),
            ["http in", "http response"]
        );
        assert!(Expect::from_flows(b"{}").is_err());
        assert!(Expect::from_flows(br#"[{"id":"x"}]"#).is_err());
    }
}
