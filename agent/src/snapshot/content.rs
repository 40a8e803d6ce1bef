//! What a staged snapshot's components must hold before Node-RED runs
//! them: `flows.json` a list of nodes, `env.json` environment variables
//! that cannot change how Node.js loads code or where the agent's settings
//! are. Checked after the hashes (the bytes are the signed ones) and before
//! the switch, so a snapshot that fails here never runs.

use std::path::Path;

use crate::node_red::probe::Expect;

/// The environment variables component.
pub const ENV: &str = "env.json";
/// Most variables a snapshot may set.
pub const MAX_VARS: usize = 256;
/// Longest value, bytes.
pub const MAX_VALUE: usize = 32 * 1024;
const MAX_NAME: usize = 128;
/// Names a snapshot may not set: they change how Node.js or the loader
/// runs, or what the agent's settings read.
const DENIED_PREFIXES: &[&str] = &["LD_", "NODE_", "TETHER_", "NPM_CONFIG_", "DYLD_"];
const DENIED: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "SHELL", "NODE_RED_HOME"];

/// What the checks found in a version's folder.
#[derive(Clone, Debug)]
pub struct Content {
    pub expect: Expect,
    pub env: Vec<(String, String)>,
}

/// Reads and checks `flows.json` and `env.json` (if present) in `dir`.
pub fn check(dir: &Path) -> Result<Content, String> {
    let flows = std::fs::read(dir.join(tether_proto::snapshot::FLOWS))
        .map_err(|e| format!("cannot read flows.json: {e}"))?;
    let expect = Expect::from_flows(&flows)?;
    let env = match std::fs::read(dir.join(ENV)) {
        Ok(bytes) => parse_env(&bytes)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("cannot read env.json: {e}")),
    };
    Ok(Content { expect, env })
}

/// `env.json`: an object of names to string values.
pub fn parse_env(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes)
        .map_err(|e| format!("env.json is not an object of names to strings: {e}"))?;
    if map.len() > MAX_VARS {
        return Err(format!(
            "env.json sets {} variables, more than {MAX_VARS}",
            map.len()
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (name, value) in map {
        let Some(value) = value.as_str() else {
            return Err(format!("env.json: {name} is not a string"));
        };
        if !is_env_name(&name) {
            return Err(format!(
                "env.json: {name:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*, at most {MAX_NAME} bytes)"
            ));
        }
        let upper = name.to_ascii_uppercase();
        if DENIED.contains(&upper.as_str()) || DENIED_PREFIXES.iter().any(|p| upper.starts_with(p))
        {
            return Err(format!(
                "env.json may not set {name}: it changes how Node.js or the agent's settings run"
            ));
        }
        if value.len() > MAX_VALUE || value.contains('\0') {
            return Err(format!(
                "env.json: the value of {name} is longer than {MAX_VALUE} bytes or holds a NUL"
            ));
        }
        out.push((name, value.to_owned()));
    }
    Ok(out)
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= MAX_NAME
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_variables_pass_and_loader_variables_are_refused() {
        let env = parse_env(br#"{"LINE": "3", "_x9": "a b"}"#).unwrap();
        assert_eq!(
            env,
            [("LINE".into(), "3".into()), ("_x9".into(), "a b".into())]
        );
        for bad in [
            r#"{"NODE_OPTIONS": "--require /tmp/x.js"}"#,
            r#"{"node_path": "/tmp"}"#,
            r#"{"LD_PRELOAD": "/tmp/x.so"}"#,
            r#"{"PATH": "/tmp"}"#,
            r#"{"TETHER_SNAPSHOT": "/"}"#,
            r#"{"9A": "x"}"#,
            r#"{"A-B": "x"}"#,
            r#"{"A": 1}"#,
            r#"["A"]"#,
        ] {
            assert!(parse_env(bad.as_bytes()).is_err(), "{bad}");
        }
        let many: serde_json::Map<String, serde_json::Value> = (0..=MAX_VARS)
            .map(|i| (format!("V{i}"), "x".into()))
            .collect();
        assert!(parse_env(&serde_json::to_vec(&many).unwrap()).is_err());
    }
}
