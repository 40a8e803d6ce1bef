// Cold loads of the Node-RED editor in headless Chromium, for
// `tether-editor-bench load` (tests/src/bin/tether-editor-bench.rs).
//
// The benchmark starts this script once and drives it over stdin, one JSON
// command a line; each answer is one JSON line on stdout:
//
//   {"kind":"tunnel","url":"https://localhost:P/devices/ID/editor/","base":"https://localhost:P",
//    "editor_origin":"https://dev-HEX.devices.localhost:P","user":"u","password":"p"}
//   {"kind":"direct","url":"http://127.0.0.1:1880/","token":"v1...."}
//
// Every load runs in a fresh browser context (empty cache, no cookies). A
// tunnel load first logs in to the platform (the login page for its CSRF
// token, then POST /login from the context, not timed), then navigates to
// the editor: the platform hands the browser over to the device's editor
// origin (two redirects, timed as part of the load). Timed from just before
// `page.goto` to: the palette rendered (more than 20 `.red-ui-palette-node`),
// and the last HTTP response of the load: the network is taken as quiet once
// no request has been in flight, started or finished for 1.5 s after the
// palette rendered (the comms WebSocket does not count). Bytes are what Chromium reports per request
// (`request.sizes()`: response headers and encoded body). Requests to other
// origins (the palette manager's catalogue on catalogue.nodered.org) fail
// offline and are counted apart.
//
//   PLAYWRIGHT_CORE   path of the playwright-core package
//   CHROMIUM          the browser binary (default /usr/bin/chromium)
//   EDITOR_BENCH_DEBUG=1  also lists every request and comms frame on stderr
//   EDITOR_BENCH_SHOT=DIR  a screenshot of each load, once quiet, in DIR
'use strict';

const { chromium } = require(process.env.PLAYWRIGHT_CORE || 'playwright-core');
const readline = require('readline');

const TIMEOUT = 60000;
const QUIET = 1500;
const DEBUG = process.env.EDITOR_BENCH_DEBUG === '1';

async function load(browser, cmd) {
    const options = { ignoreHTTPSErrors: true, viewport: { width: 1400, height: 900 } };
    if (cmd.kind === 'direct') options.extraHTTPHeaders = { 'x-tether-token': cmd.token };
    const context = await browser.newContext(options);
    try {
        if (cmd.kind === 'tunnel') {
            const form = await (await context.request.get(`${cmd.base}/login`)).text();
            const csrf = (form.match(/name="csrf" value="([0-9a-f]+)"/) || [])[1];
            if (!csrf) throw new Error('the login page has no CSRF token');
            const answer = await context.request.post(`${cmd.base}/login`, {
                form: { user: cmd.user, password: cmd.password, csrf },
                headers: { origin: cmd.base },
                maxRedirects: 0,
            });
            if (answer.status() !== 303) throw new Error(`login answered ${answer.status()}`);
        }
        const page = await context.newPage();
        page.setDefaultTimeout(TIMEOUT);
        const requests = [];
        let lastResponse = 0;
        let lastActivity = Date.now();
        let inflight = 0;
        page.on('request', () => {
            inflight += 1;
            lastActivity = Date.now();
        });
        const origin = cmd.editor_origin || new URL(cmd.url).origin;
        let failed = 0;
        let external = 0;
        let websockets = 0;
        page.on('requestfinished', (request) => {
            const at = Date.now();
            inflight -= 1;
            lastActivity = at;
            lastResponse = Math.max(lastResponse, at);
            requests.push(
                request.sizes().then(async (sizes) => {
                    const response = await request.response();
                    return {
                        url: request.url(),
                        status: response ? response.status() : 0,
                        body: sizes.responseBodySize,
                        headers: sizes.responseHeadersSize,
                        at,
                    };
                }),
            );
        });
        page.on('requestfailed', (request) => {
            inflight -= 1;
            lastActivity = Date.now();
            // The palette manager asks catalogue.nodered.org, which this
            // machine cannot reach: not part of the load, the same for both.
            if (new URL(request.url()).origin !== origin) external += 1;
            else failed += 1;
            if (DEBUG) console.error(`FAILED ${request.url()} ${request.failure() && request.failure().errorText}`);
        });
        page.on('websocket', (ws) => {
            websockets += 1;
            if (DEBUG) {
                console.error(`WS ${ws.url()}`);
                ws.on('framesent', (f) => console.error(`  ws> ${String(f.payload).slice(0, 200)}`));
                ws.on('framereceived', (f) => console.error(`  ws< ${String(f.payload).slice(0, 200)}`));
            }
        });
        const start = Date.now();
        await page.goto(cmd.url, { waitUntil: 'commit' });
        await page.waitForFunction(() => document.querySelectorAll('.red-ui-palette-node').length > 20, null, { polling: 10 });
        const palette = Date.now() - start;
        // Quiet: nothing in flight and nothing started or finished for
        // QUIET ms. (Playwright's own `networkidle` is no use here: it is
        // reached in the pause while the browser compiles the scripts, before
        // the editor asks for its settings, nodes and icons.)
        for (;;) {
            const now = Date.now();
            if (inflight === 0 && now - lastActivity >= QUIET) break;
            if (now - start > TIMEOUT) throw new Error('the network never went quiet');
            await page.waitForTimeout(50);
        }
        if (process.env.EDITOR_BENCH_SHOT) {
            await page.screenshot({ path: `${process.env.EDITOR_BENCH_SHOT}/${cmd.kind}.png` });
        }
        const list = await Promise.all(requests);
        const idle = lastResponse - start;
        const bad = list.filter((r) => r.status >= 400);
        if (DEBUG) {
            for (const r of list) console.error(`${r.status} ${r.body + r.headers} B +${r.at - start} ms ${r.url}`);
        }
        return {
            palette_ms: palette,
            idle_ms: idle,
            requests: list.length,
            failed,
            external,
            errors: bad.length,
            body_bytes: list.reduce((s, r) => s + Math.max(0, r.body), 0),
            header_bytes: list.reduce((s, r) => s + Math.max(0, r.headers), 0),
            websockets,
        };
    } finally {
        await context.close();
    }
}

(async () => {
    const browser = await chromium.launch({
        executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
        args: ['--no-sandbox'],
    });
    console.log(JSON.stringify({ ready: true }));
    const lines = readline.createInterface({ input: process.stdin });
    for await (const line of lines) {
        if (!line.trim()) continue;
        let answer;
        try {
            answer = await load(browser, JSON.parse(line));
        } catch (e) {
            answer = { error: e.message };
        }
        console.log(JSON.stringify(answer));
    }
    await browser.close();
})().catch((e) => {
    console.error(`editor-load FAILED: ${e.message}`);
    process.exit(1);
});
