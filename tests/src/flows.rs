//! The flows the snapshot tests and benchmarks sign: `GET /hello` answers
//! the environment variable `GREETING`, which the snapshot's `env.json`
//! sets.

/// The hello flow, plus, when `broken`, a node of a type nobody installed
/// (its flows cannot start).
pub fn hello(broken: bool) -> Vec<u8> {
    let mut nodes = serde_json::json!([
        {"id": "t1", "type": "tab", "label": "hello"},
        {"id": "in1", "type": "http in", "z": "t1", "url": "/hello", "method": "get",
         "wires": [["set1"]]},
        {"id": "set1", "type": "change", "z": "t1",
         "rules": [{"t": "set", "p": "payload", "pt": "msg", "to": "GREETING", "tot": "env"}],
         "wires": [["out1"]]},
        {"id": "out1", "type": "http response", "z": "t1", "statusCode": "", "headers": {},
         "wires": []}
    ]);
    if broken && let Some(nodes) = nodes.as_array_mut() {
        nodes.push(serde_json::json!(
            {"id": "x1", "type": "tether-not-installed", "z": "t1", "wires": []}
        ));
    }
    serde_json::to_vec(&nodes).unwrap_or_default()
}

/// A snapshot's files: the hello flow and `env.json` with `greeting`.
pub fn hello_files(greeting: &str, broken: bool) -> Vec<(String, Vec<u8>)> {
    vec![
        ("flows.json".into(), hello(broken)),
        (
            "env.json".into(),
            serde_json::to_vec(&serde_json::json!({ "GREETING": greeting })).unwrap_or_default(),
        ),
    ]
}
