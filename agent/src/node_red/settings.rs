//! The Node-RED settings file the agent generates (`docs/protocol.md`
//! §16.4): Node-RED listens on 127.0.0.1 only, and its editor and admin API
//! accept nothing but tokens the agent signed.
//!
//! The file holds no secret: it reads the public keys from
//! [`super::token::KEYS_FILE`] next to it (again whenever that file
//! changes) and verifies each token with Node's own crypto. There is no
//! default user and no user list, so a request without a valid token is
//! answered 401 and no login exists. Flows' own HTTP endpoints
//! (`httpNodeRoot`, `/`) stay open to local clients, as without the agent,
//! but never to a request the agent proxied: `httpNodeMiddleware` answers
//! 404 to any request to a flow's `http in` that carries the agent's token
//! header (and removes every `x-tether-*` header from the others), and
//! `webSocketNodeVerifyClient` refuses such a WebSocket upgrade to a flow's
//! `websocket in`. So no flow ever reads a token the agent minted.
//!
//! This module only renders text; `super` writes it.

/// The settings file, in Node-RED's user directory.
pub const SETTINGS_FILE: &str = "tether-settings.js";
/// The folder, inside a snapshot's, that Node-RED loads the snapshot's
/// modules from (its `node_modules`).
pub const MODULES_DIR: &str = "lib";
/// The request header that carries the token.
pub const TOKEN_HEADER: &str = "x-tether-token";
/// Node-RED's `httpAdminRoot`: the editor and admin API are at `/`.
pub const ADMIN_ROOT: &str = "/";

/// The settings for a Node-RED on `127.0.0.1:port`.
pub fn render(port: u16) -> String {
    TEMPLATE
        .replace("@PORT@", &port.to_string())
        .replace("@HEADER@", TOKEN_HEADER)
        .replace("@KEYS_FILE@", super::token::KEYS_FILE)
        .replace("@ENV_SNAPSHOT@", super::launcher::ENV_SNAPSHOT)
        .replace("@ENV_FLOWS@", super::launcher::ENV_FLOWS)
        .replace("@LIB@", MODULES_DIR)
}

const TEMPLATE: &str = r#"// Written by tetherd at every start: edits are lost. Node-RED's editor and
// admin API answer only requests carrying a token tetherd signed
// (docs/protocol.md, section 16.4). The keys file holds public keys only.
"use strict";
const crypto = require("crypto");
const fs = require("fs");
const path = require("path");

const KEYS_FILE = path.join(__dirname, "@KEYS_FILE@");
const CONTEXT = Buffer.from("tether-editor-v1\n");
const MAX_LIFETIME = 125; // seconds: 120 and a little clock slack
const MAX_CACHED = 256;
const B64URL = /^[A-Za-z0-9_-]+$/;
const NOT_FOR_FLOWS = "flows' own endpoints are not reachable through remote editor access\n";

// True if a request came through the agent (it carries the agent's token).
function fromAgent(headers) {
    return Object.prototype.hasOwnProperty.call(headers, "@HEADER@");
}

// Flows never see the agent's headers, and never a request the agent
// proxied (belt and braces: the agent carries the editor's routes only).
function flowsMiddleware(req, res, next) {
    if (fromAgent(req.headers)) {
        res.status(404).set("Content-Type", "text/plain").send(NOT_FOR_FLOWS);
        return;
    }
    for (const name of Object.keys(req.headers)) {
        if (name.startsWith("x-tether-")) delete req.headers[name];
    }
    next();
}

function flowsWebSocket(info) {
    if (fromAgent(info.req.headers)) return false;
    for (const name of Object.keys(info.req.headers)) {
        if (name.startsWith("x-tether-")) delete info.req.headers[name];
    }
    return true;
}

// What the agent runs: a signed snapshot's folder and the flows file to
// use, from the environment the agent started Node-RED with. Removed from
// the environment at once, so no flow reads them.
const SNAPSHOT = process.env.@ENV_SNAPSHOT@ || null;
const FLOW_FILE = process.env.@ENV_FLOWS@ || "flows.json";
delete process.env.@ENV_SNAPSHOT@;
delete process.env.@ENV_FLOWS@;

// The settings a snapshot may set (its settings.json): the credential
// secret and a short list of runtime options. Nothing here can reach the
// listener, the admin API's authentication or the flows' middleware.
const CONTROLLED = {
    credentialSecret: "string",
    debugMaxLength: "number",
    nodeMessageBufferMaxLength: "number",
    functionExternalModules: "boolean",
    functionTimeout: "number",
    exportGlobalContextKeys: "boolean",
    externalModules: "object",
    contextStorage: "object",
};

function controlledSettings() {
    if (!SNAPSHOT) return {};
    let given;
    try {
        given = JSON.parse(fs.readFileSync(path.join(SNAPSHOT, "settings.json"), "utf8"));
    } catch (e) {
        if (e.code === "ENOENT") return {};
        throw new Error("tether: the snapshot's settings.json is unreadable: " + e.message);
    }
    const out = {};
    for (const [key, type] of Object.entries(CONTROLLED)) {
        if (Object.prototype.hasOwnProperty.call(given, key)) {
            if (typeof given[key] !== type || given[key] === null) {
                throw new Error("tether: the snapshot's setting " + key + " must be a " + type);
            }
            out[key] = given[key];
        }
    }
    return out;
}

// The snapshot's modules (`lib/`, installed by the agent with npm): Node-RED
// loads them from there, so each snapshot runs the modules it was signed
// with.
function snapshotModules() {
    if (!SNAPSHOT) return {};
    const lib = path.join(SNAPSHOT, "@LIB@");
    return fs.existsSync(path.join(lib, "node_modules")) ? { nodesDir: [lib] } : {};
}

let keys = [];
let keysVersion = null;
const verified = new Map(); // token -> {username, permissions, exp}

// The public keys, read again whenever the file is replaced.
function currentKeys() {
    let version = null;
    try {
        const st = fs.statSync(KEYS_FILE);
        version = st.ino + ":" + st.mtimeMs + ":" + st.size;
    } catch (e) {}
    if (version !== keysVersion) {
        keysVersion = version;
        verified.clear();
        try {
            const file = JSON.parse(fs.readFileSync(KEYS_FILE, "utf8"));
            keys = file.keys.map((x) => crypto.createPublicKey({
                key: { kty: "OKP", crv: "Ed25519", x: x },
                format: "jwk",
            }));
        } catch (e) {
            keys = [];
        }
    }
    return keys;
}

function validPermissions(p) {
    return p === "*" || p === "read" ||
        (Array.isArray(p) && p.every((s) => typeof s === "string"));
}

// v1.BASE64URL(payload).BASE64URL(signature) -> the user, or null.
function verify(token, now) {
    const parts = token.split(".");
    if (parts.length !== 3 || parts[0] !== "v1" ||
        !B64URL.test(parts[1]) || !B64URL.test(parts[2])) {
        return null;
    }
    const payload = Buffer.from(parts[1], "base64url");
    const signature = Buffer.from(parts[2], "base64url");
    const data = Buffer.concat([CONTEXT, payload]);
    const signed = currentKeys().some((key) => {
        try { return crypto.verify(null, data, key, signature); } catch (e) { return false; }
    });
    if (!signed) {
        return null;
    }
    let claims;
    try { claims = JSON.parse(payload.toString("utf8")); } catch (e) { return null; }
    if (typeof claims.u !== "string" || !Number.isSafeInteger(claims.exp) ||
        claims.exp > now + MAX_LIFETIME || !validPermissions(claims.p)) {
        return null;
    }
    return { username: claims.u, permissions: claims.p, exp: claims.exp };
}

function remember(token, user, now) {
    if (verified.size >= MAX_CACHED) {
        for (const [t, u] of verified) {
            if (u.exp <= now) verified.delete(t);
        }
        if (verified.size >= MAX_CACHED) verified.clear();
    }
    verified.set(token, user);
}

async function tokens(token) {
    const now = Math.floor(Date.now() / 1000);
    if (typeof token !== "string" || token.length > 4096) {
        return null;
    }
    currentKeys(); // empties the cache when the keys changed
    let user = verified.get(token);
    if (!user) {
        user = verify(token, now);
        if (!user) return null;
        remember(token, user, now);
    }
    if (user.exp <= now) {
        verified.delete(token);
        return null;
    }
    return { username: user.username, permissions: user.permissions };
}

module.exports = {
    ...controlledSettings(),
    ...snapshotModules(),
    userDir: __dirname,
    flowFile: FLOW_FILE,
    uiHost: "127.0.0.1",
    uiPort: @PORT@,
    adminAuth: {
        tokenHeader: "@HEADER@",
        tokens: tokens,
    },
    httpNodeMiddleware: flowsMiddleware,
    webSocketNodeVerifyClient: flowsWebSocket,
    logging: {
        console: { level: "info", metrics: false, audit: true },
    },
    // A gateway does not report to nodered.org unless its operator says so,
    // and an engineer opening the editor is not asked on their behalf.
    telemetry: { enabled: false, updateNotification: false },
    // Engineers reach this editor to fix a machine, not to tour the release.
    editorTheme: { tours: false },
};
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_name_the_port_header_and_keys_file_and_no_user() {
        let js = render(1881);
        assert!(js.contains("uiHost: \"127.0.0.1\""), "{js}");
        assert!(js.contains("uiPort: 1881,"), "{js}");
        assert!(js.contains("tokenHeader: \"x-tether-token\""), "{js}");
        assert!(js.contains("\"tether-editor-keys.json\""), "{js}");
        assert!(!js.contains('@'), "placeholder left: {js}");
        for absent in [
            "default:",
            "users:",
            "type:",
            "httpNodeRoot",
            "httpAdminRoot",
        ] {
            assert!(!js.contains(absent), "{absent} in {js}");
        }
    }
}
