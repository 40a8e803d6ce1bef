// End-to-end check of remote editor access in a real headless Chromium.
//
// The Rust test `tests/tests/editor_browser.rs` starts the platform, an
// enrolled tetherd and the device's Node-RED, creates the users, and runs
// this script with the environment below. Each step prints one line; the
// first failure prints why and exits 1.
//
//   TETHER_URL        https://localhost:PORT (the platform)
//   TETHER_DEVICE     the device id
//   HOSTILE_DEVICE    a device whose editor answers with a hostile page
//                     (tests/browser/hostile.html): a compromised device
//   OWNER, OWNER_PASSWORD, VIEWER, VIEWER_PASSWORD
//   NODE_RED_LOCAL    http://127.0.0.1:PORT (the device's Node-RED, direct)
//   SCREENSHOT_DIR    where the screenshots go
//   PLAYWRIGHT_CORE   path of the playwright-core package
//   CHROMIUM          the browser binary (default /usr/bin/chromium)
'use strict';

const { chromium } = require(process.env.PLAYWRIGHT_CORE || 'playwright-core');
const path = require('path');

const env = (name) => {
    const value = process.env[name];
    if (!value) throw new Error(`environment variable ${name} is not set`);
    return value;
};
const BASE = env('TETHER_URL');
const DEVICE = env('TETHER_DEVICE');
const EDITOR = `${BASE}/devices/${DEVICE}/editor/`;
const HOSTILE = env('HOSTILE_DEVICE');
// Each device's editor has an origin of its own: dev-<hex>.devices.HOST.
const deviceOrigin = (id) => `https://dev-${id.slice(4)}.devices.${new URL(BASE).host}`;
const EDITOR_ORIGIN = deviceOrigin(DEVICE);
const LOCAL = env('NODE_RED_LOCAL');
const SHOTS = env('SCREENSHOT_DIR');
const STEP_TIMEOUT = 30000;

const FLOW = [
    { id: 'e2e-in', type: 'http in', name: 'hello', url: '/hello', method: 'get', x: 120, y: 80, wires: [['e2e-fn']] },
    { id: 'e2e-fn', type: 'change', name: '', rules: [{ t: 'set', p: 'payload', pt: 'msg', to: 'deployed through tether', tot: 'str' }], x: 320, y: 80, wires: [['e2e-out']] },
    { id: 'e2e-out', type: 'http response', name: '', statusCode: '', headers: {}, x: 520, y: 80, wires: [] },
];

function step(text) {
    console.log(`- ${text}`);
}

async function login(browser, user, password) {
    // The platform's certificate comes from its own CA, which the browser
    // does not know; this is the one check the test waives.
    const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1400, height: 900 } });
    const page = await context.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT);
    await page.goto(EDITOR);
    if (!page.url().includes('/login')) throw new Error(`expected the login page, got ${page.url()}`);
    await page.fill('input[name=user]', user);
    await page.fill('input[name=password]', password);
    await Promise.all([page.waitForNavigation(), page.click('button[type=submit], input[type=submit]')]);
    await page.waitForURL(`${EDITOR_ORIGIN}/`);
    if (page.url() !== `${EDITOR_ORIGIN}/`) {
        const text = (await page.textContent('body')).replace(/\s+/g, ' ').trim();
        throw new Error(`after logging in as ${user} the browser is at ${page.url()}: ${text.slice(0, 300)}`);
    }
    step(`${user} logged in and was handed over to the editor's own origin ${EDITOR_ORIGIN}`);
    return { context, page };
}

async function editorRendered(page, who) {
    await page.waitForSelector('#red-ui-workspace-chart');
    await page.waitForFunction(() => document.querySelectorAll('.red-ui-palette-node').length > 20);
    const nodes = await page.$$eval('.red-ui-palette-node', (list) => list.length);
    step(`${who}: the editor rendered through the tunnel, palette shows ${nodes} nodes`);
}

// Posts the flows from the page itself, with the page's own cookies, as the
// editor's deploy does; returns the status and the message of the answer.
async function postFlows(page) {
    return page.evaluate(async (flow) => {
        const res = await fetch('flows', {
            method: 'POST',
            headers: { 'Content-Type': 'application/json', 'Node-RED-Deployment-Type': 'full' },
            body: JSON.stringify({ flows: flow }),
        });
        // Like the editor's own deploy, accept anything: a refusal is then
        // the bare sentence the editor shows after "Deploy failed:".
        return { status: res.status, message: await res.text() };
    }, FLOW);
}

async function localHello() {
    for (let i = 0; i < 100; i++) {
        try {
            const res = await fetch(`${LOCAL}/hello`);
            if (res.status === 200) return await res.text();
        } catch (e) { /* not up yet */ }
        await new Promise((r) => setTimeout(r, 200));
    }
    throw new Error(`${LOCAL}/hello never answered 200 after the deploy`);
}

async function owner(browser) {
    const { context, page } = await login(browser, env('OWNER'), env('OWNER_PASSWORD'));
    await editorRendered(page, 'owner');
    const canWrite = await page.evaluate(() => RED.user.hasPermission('flows.write'));
    if (!canWrite) throw new Error('the owner is shown a read-only editor');
    // As the editor's Import dialog does: add the nodes, mark the flows changed.
    await page.evaluate((flow) => {
        RED.view.importNodes(flow, { generateIds: false });
        RED.nodes.dirty(true);
    }, FLOW);
    try {
        await page.waitForSelector('#red-ui-header-button-deploy:not(.disabled)');
    } catch (e) {
        await page.screenshot({ path: path.join(SHOTS, 'editor-owner-failed.png') });
        const why = await page.evaluate(() => ({ dirty: RED.nodes.dirty(), cls: document.querySelector('#red-ui-header-button-deploy').className, user: RED.settings.user }));
        console.log(JSON.stringify(why));
        throw new Error(`the deploy button did not enable after importing the flow (see editor-owner-failed.png): ${e.message}`);
    }
    await page.click('#red-ui-header-button-deploy');
    const body = await localHello();
    if (body !== 'deployed through tether') throw new Error(`/hello answered ${JSON.stringify(body)}`);
    step('owner: deployed an HTTP endpoint from the editor; it answers locally on the device');
    // A flow's endpoint is not part of the editor: remote editor access
    // does not reach it (a service meant for engineers is a [[service]]).
    const viaEditor = await page.evaluate(async () => {
        const res = await fetch('hello');
        return { status: res.status, text: await res.text() };
    });
    if (viaEditor.status !== 403 || viaEditor.text.includes('deployed through tether')) {
        throw new Error(`the flow's /hello answered ${viaEditor.status} through the editor: ${viaEditor.text.slice(0, 200)}`);
    }
    step(`owner: the flow's /hello is not reachable through the editor (${viaEditor.status})`);
    await page.waitForFunction(() => !RED.nodes.dirty());
    await page.waitForTimeout(1500); // let the "Successfully deployed" notice settle
    await page.screenshot({ path: path.join(SHOTS, 'editor-owner.png') });
    step(`screenshot: ${path.join(SHOTS, 'editor-owner.png')}`);
    return { context, page };
}

async function viewer(browser) {
    const { context, page } = await login(browser, env('VIEWER'), env('VIEWER_PASSWORD'));
    await editorRendered(page, 'viewer');
    const state = await page.evaluate(() => ({
        canWrite: RED.user.hasPermission('flows.write'),
        readOnly: document.querySelector('.red-ui-deploy-button-group.readOnly') !== null,
    }));
    if (state.canWrite || !state.readOnly) throw new Error(`the viewer's editor is not read-only: ${JSON.stringify(state)}`);
    step('viewer: the editor shows read-only (deploy disabled)');
    const answer = await postFlows(page);
    if (answer.status !== 403) throw new Error(`a viewer's deploy got ${answer.status}, expected 403`);
    if (!answer.message.includes('viewer')) throw new Error(`the refusal does not say why: ${answer.message}`);
    step(`viewer: a deploy is refused with 403 ("${answer.message}")`);
    await page.screenshot({ path: path.join(SHOTS, 'editor-viewer.png') });
    await context.close();
}

// The protection mode shown for `device` on the platform's device list.
async function listedProtection(context, device) {
    const list = await context.newPage();
    await list.goto(`${BASE}/`);
    const cell = await list.textContent(`tr:has(code:text-is("${device}")) td:nth-child(4)`);
    const user = await list.textContent('body');
    await list.close();
    return { on: cell.trim().startsWith('on'), loggedIn: user.includes('Logged in as') };
}

// A compromised device's editor origin serves a page that attacks the
// platform with the engineer's browser (tests/browser/hostile.html). Every
// attempt must fail, and the engineer's session and every device's
// protection mode must be as they were.
async function hostile(context) {
    const before = await listedProtection(context, HOSTILE);
    const page = await context.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT);
    await page.goto(`${BASE}/devices/${HOSTILE}/editor/`);
    const origin = deviceOrigin(HOSTILE);
    if (!page.url().startsWith(`${origin}/`)) throw new Error(`the hostile device's editor is at ${page.url()}, not on ${origin}`);
    await page.waitForFunction(() => window.__done === true, null, { timeout: STEP_TIMEOUT });
    const results = await page.evaluate(() => window.__results);
    console.log(`  hostile page results: ${JSON.stringify(results)}`);
    const failed = Object.entries(results).filter(([, r]) => r.succeeded);
    if (failed.length) throw new Error(`hostile attempts succeeded: ${JSON.stringify(failed)}`);
    for (const name of ['serviceWorker', 'platformServiceWorker', 'readPlatformPage', 'postProtection', 'postForm', 'framePlatform', 'plantCookie']) {
        if (!(name in results)) throw new Error(`the hostile page did not try ${name}`);
    }
    const registrations = await page.evaluate(async () => (await navigator.serviceWorker.getRegistrations()).length);
    if (registrations !== 0) throw new Error(`${registrations} service worker(s) registered on the device origin`);
    step(`hostile device: ${Object.keys(results).length} attacks on the platform from its editor origin all failed`);
    // A redirect the device answers with //elsewhere goes nowhere.
    const answer = await page.goto(`${origin}/red/go-elsewhere`);
    if (!page.url().startsWith(`${origin}/`)) throw new Error(`the device's redirect took the browser to ${page.url()}`);
    if (answer.headers()['location']) throw new Error(`a device's off-origin Location reached the browser: ${answer.headers()['location']}`);
    step(`hostile device: its redirect to //evil.example was dropped (status ${answer.status()}, still on ${origin})`);
    await page.close();
    const after = await listedProtection(context, HOSTILE);
    if (!after.loggedIn) throw new Error('the engineer is no longer logged in to the platform');
    if (after.on !== before.on) throw new Error(`the hostile device's protection changed: ${before.on} -> ${after.on}`);
    const real = await listedProtection(context, DEVICE);
    if (real.on) throw new Error('the other device\'s protection changed');
    step('hostile device: the engineer is still logged in and no protection mode changed');
}

async function protection(context, page) {
    const list = await context.newPage();
    await list.goto(`${BASE}/`);
    await Promise.all([
        list.waitForNavigation(),
        list.click(`form[action="/devices/${DEVICE}/protection"] button`),
    ]);
    await list.close();
    if (!(await listedProtection(context, DEVICE)).on) throw new Error('protection mode did not turn on');
    step('owner: turned instance protection mode on from the platform\'s device list');
    let answer;
    for (let i = 0; i < 50; i++) {
        answer = await postFlows(page);
        if (answer.status === 403) break;
        await new Promise((r) => setTimeout(r, 200));
    }
    if (answer.status !== 403) throw new Error(`with protection mode on, an owner's deploy got ${answer.status}`);
    if (!answer.message.includes('read-only')) throw new Error(`the refusal does not say why: ${answer.message}`);
    step(`owner: with protection mode on, a deploy is refused with 403 ("${answer.message}")`);
    // The owner's editor was opened before protection mode: its Deploy
    // button still works, and the refusal must read well where it shows.
    await page.evaluate(() => {
        RED.view.importNodes([{ id: 'e2e-late', type: 'comment', name: 'late change', x: 120, y: 160, wires: [] }], { generateIds: false });
        RED.nodes.dirty(true);
    });
    await page.waitForSelector('#red-ui-header-button-deploy:not(.disabled)');
    await page.click('#red-ui-header-button-deploy');
    const notice = await page.waitForSelector('.red-ui-notification-error');
    const text = (await notice.textContent()).replace(/\s+/g, ' ').trim();
    if (!text.includes('read-only') || text.includes('{')) throw new Error(`the editor's deploy notice reads: ${text}`);
    await page.waitForTimeout(1000); // the notice slides in
    await page.screenshot({ path: path.join(SHOTS, 'editor-protection.png') });
    step(`owner: the editor itself says: "${text.slice(0, 120)}"`);
}

(async () => {
    const browser = await chromium.launch({
        executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
        args: ['--no-sandbox'],
    });
    try {
        const { context, page } = await owner(browser);
        await viewer(browser);
        await hostile(context);
        await protection(context, page);
        await context.close();
    } finally {
        await browser.close();
    }
    console.log('editor end-to-end: all steps passed');
})().catch((e) => {
    console.error(`editor end-to-end FAILED: ${e.message}`);
    process.exit(1);
});
