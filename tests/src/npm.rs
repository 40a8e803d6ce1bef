//! npm packages made on the spot for tests of a snapshot's modules: a
//! Node-RED node module (`tether-test-node`, node type `tether-test`, which
//! sets `msg.payload` to a text from its dependency) and that dependency
//! (`tether-test-dep`), packed into tarballs with `npm pack`, so nothing
//! comes from a registry.

use std::path::{Path, PathBuf};

/// The node module's name.
pub const NODE_MODULE: &str = "tether-test-node";
/// Its dependency's name.
pub const DEP_MODULE: &str = "tether-test-dep";
/// The node type the module registers.
pub const NODE_TYPE: &str = "tether-test";

/// npm: `$TETHER_NPM` or `npm` in `PATH`, as a path.
pub fn npm() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("TETHER_NPM") {
        return Ok(PathBuf::from(path));
    }
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .map(|dir| dir.join("npm"))
        .find(|p| p.is_file())
        .ok_or_else(|| "npm not found in PATH (it comes with Node.js: apt-get install npm)".into())
}

/// Packs the node module at `version` (answering `text`) and its
/// dependency into `out`; their snapshot paths and bytes
/// (`modules/NAME-VERSION.tgz`).
pub fn packed_modules(
    npm: &Path,
    work: &Path,
    version: &str,
    text: &str,
) -> Vec<(String, Vec<u8>)> {
    let dep = work.join(format!("dep-{version}"));
    write(
        &dep.join("package.json"),
        &serde_json::json!({"name": DEP_MODULE, "version": "1.0.0", "main": "index.js"}),
    );
    std::fs::write(
        dep.join("index.js"),
        format!(
            "module.exports = {{ text: {} }};\n",
            serde_json::json!(text)
        ),
    )
    .unwrap();
    let node = work.join(format!("node-{version}"));
    write(
        &node.join("package.json"),
        &serde_json::json!({
            "name": NODE_MODULE, "version": version,
            "dependencies": {DEP_MODULE: "1.0.0"},
            "node-red": {"nodes": {NODE_TYPE: "test.js"}}
        }),
    );
    std::fs::write(
        node.join("test.js"),
        format!(
            "module.exports = function (RED) {{\n\
             \x20 const dep = require(\"{DEP_MODULE}\");\n\
             \x20 function TetherTest(config) {{\n\
             \x20   RED.nodes.createNode(this, config);\n\
             \x20   this.on(\"input\", (msg, send, done) => {{ msg.payload = dep.text; send(msg); done(); }});\n\
             \x20 }}\n\
             \x20 RED.nodes.registerType(\"{NODE_TYPE}\", TetherTest);\n\
             }};\n"
        ),
    )
    .unwrap();
    std::fs::write(
        node.join("test.html"),
        format!(
            "<script type=\"text/javascript\">RED.nodes.registerType(\"{NODE_TYPE}\", \
             {{category: \"function\", defaults: {{}}, inputs: 1, outputs: 1, label: \"{NODE_TYPE}\"}});</script>\n"
        ),
    )
    .unwrap();
    let out = work.join(format!("packed-{version}"));
    std::fs::create_dir_all(&out).unwrap();
    let mut files = Vec::new();
    for dir in [&dep, &node] {
        let status = std::process::Command::new(npm)
            .args(["pack", "--silent", "--pack-destination"])
            .arg(&out)
            .current_dir(dir)
            .env("npm_config_cache", work.join("npm-cache"))
            .env("npm_config_update_notifier", "false")
            .stdout(std::process::Stdio::null())
            .status()
            .expect("npm runs");
        assert!(status.success(), "npm pack in {}", dir.display());
    }
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        files.push((format!("modules/{name}"), std::fs::read(&path).unwrap()));
    }
    files.sort();
    let names: Vec<&String> = files.iter().map(|(name, _)| name).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    files
}

/// `modules.json` pinning the node module at `version`.
pub fn modules_json(version: &str) -> (String, Vec<u8>) {
    (
        "modules.json".into(),
        serde_json::to_vec(&serde_json::json!({ NODE_MODULE: version })).unwrap(),
    )
}

fn write(path: &Path, json: &serde_json::Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_vec_pretty(json).unwrap()).unwrap();
}
