// Browser tests of the operator console: starts the real `tally-server serve` on its embedded
// PostgreSQL (a throwaway data directory), seeds a user with usage through the JSON API, drives
// Debian's Chromium headless through Playwright — sign in, find the user, see the usage chart
// render, grant access and see the entitlement change through the API, revoke it; see a webhook
// endpoint's dead letter (a receiver on loopback answering 500) and replay it once the receiver
// is back — writes a screenshot of the user page to docs/console-user.png, and stops everything
// it started.
//
// Environment: TALLY_SERVER_BIN (default: the debug binary of the cargo target directory),
// TALLY_CHROMIUM (default /usr/bin/chromium), TALLY_CONSOLE_SCREENSHOT (default
// docs/console-user.png of the repository).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { createHmac, randomUUID } from "node:crypto";
import { mkdtempSync, writeFileSync, chmodSync, rmSync, existsSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../..");
const targetDir = resolve(repo, process.env.CARGO_TARGET_DIR || "target");
const serverBin = process.env.TALLY_SERVER_BIN || join(targetDir, "debug", "tally-server");
const chromiumBin = process.env.TALLY_CHROMIUM || "/usr/bin/chromium";
const screenshot = resolve(repo, process.env.TALLY_CONSOLE_SCREENSHOT || "docs/console-user.png");
const SECRET = "console-browser-test-secret-0123456789";
const ADMIN = "console-admin";
const ADA = "auth0|ada";

const CATALOG = {
  plans: [
    { id: "free", display_name: "Free", features: {
      ai_chat: { type: "metered", limit: 20, period: "month", enforcement: "hard" },
      exports: { type: "metered", limit: 3, period: "day", enforcement: "soft" },
      images: { type: "credits", cost: 2 },
      sharing: { type: "flag", enabled: false } } },
    { id: "pro", display_name: "Pro", features: {
      ai_chat: { type: "metered", limit: 60, period: "month", enforcement: "hard" },
      exports: { type: "metered", limit: null, period: "day" },
      images: { type: "credits", cost: 1 },
      sharing: { type: "flag", enabled: true } } },
  ],
  products: [
    { id: "pro_monthly", store: "app_store", grants: { plan: "pro" }, display_price: "$4.99/month" },
    { id: "price_pro", store: "stripe", grants: { plan: "pro" }, trial_days: 14 },
  ],
};

let dir;
let server;
let base;
let browser;

/** An HS256 identity token for `sub`, as the identity provider would sign it. */
function jwt(sub, extra = {}) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, iat: now, exp: now + 3600, ...extra })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

async function api(method, path, token, body) {
  const resp = await fetch(base + path, {
    method,
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  return { status: resp.status, body: text ? JSON.parse(text) : null };
}

function startServer() {
  return new Promise((resolveStart, reject) => {
    const child = spawn(serverBin, ["serve"], {
      env: {
        PATH: process.env.PATH,
        TALLY_LISTEN: "127.0.0.1:0",
        TALLY_DATA_DIR: join(dir, "data"),
        TALLY_PLANS_FILE: join(dir, "plans.json"),
        TALLY_JWT_SECRET: SECRET,
        TALLY_ADMIN_SUBJECTS: ADMIN,
        TALLY_LOG: "warn",
        // Webhooks to the loopback receiver, retried fast and dead-lettered after a second.
        TALLY_WEBHOOK_ALLOW_PRIVATE: "1",
        TALLY_WEBHOOK_POLL_MS: "50",
        TALLY_WEBHOOK_BACKOFF_MS: "50",
        TALLY_WEBHOOK_RETRY_SECS: "1",
      },
      stdio: ["ignore", "pipe", "inherit"],
    });
    const timer = setTimeout(() => reject(new Error("tally-server did not start within 120 s")), 120_000);
    child.on("error", reject);
    child.on("exit", (code) => reject(new Error(`tally-server exited early (${code})`)));
    createInterface({ input: child.stdout }).once("line", (line) => {
      clearTimeout(timer);
      const m = /^tally-server listening on (http:\/\/\S+)$/.exec(line.trim());
      if (!m) return reject(new Error(`unexpected output: ${line}`));
      child.removeAllListeners("exit");
      resolveStart({ child, url: m[1] });
    });
  });
}

function stopServer() {
  return new Promise((done) => {
    if (!server || server.exitCode !== null) return done();
    const kill = setTimeout(() => server.kill("SIGKILL"), 30_000);
    server.once("exit", () => { clearTimeout(kill); done(); });
    server.kill("SIGTERM"); // graceful: the embedded cluster stops with it
  });
}

before(async () => {
  assert.ok(existsSync(serverBin), `no server binary at ${serverBin} (build it with cargo build -p tally-server)`);
  assert.ok(existsSync(chromiumBin), `no Chromium at ${chromiumBin} (apt-get install chromium)`);
  dir = mkdtempSync(join(tmpdir(), "tally-console-"));
  chmodSync(dir, 0o755); // the embedded cluster runs as the postgres user when we are root
  writeFileSync(join(dir, "plans.json"), JSON.stringify(CATALOG));
  const started = await startServer();
  server = started.child;
  base = started.url;
  const args = process.getuid && process.getuid() === 0 ? ["--no-sandbox"] : [];
  browser = await chromium.launch({ executablePath: chromiumBin, headless: true, args });
});

after(async () => {
  if (browser) await browser.close();
  await stopServer();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** A fresh browser context and page, collecting CSP violations and script errors. */
async function openPage() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const violations = [];
  page.on("console", (m) => { if (/Content Security Policy|Refused to/i.test(m.text())) violations.push(m.text()); });
  page.on("pageerror", (e) => violations.push(String(e)));
  return { context, page, violations };
}

/** Seeds Ada: two devices syncing uses today and on earlier days, and a credit grant. */
async function seed() {
  const ada = jwt(ADA, { email: "ada@example.com", email_verified: true, name: "Ada Lovelace" });
  const day = (back, hour) => new Date(Date.now() - back * 86_400_000 - hour * 3_600_000).toISOString();
  const ev = (feature, amount, when) => ({ id: randomUUID(), feature, amount, occurred_at: when });
  const phone = [ev("ai_chat", 3, day(0, 0)), ev("ai_chat", 2, day(1, 1)), ev("ai_chat", 4, day(3, 2)), ev("exports", 2, day(0, 0)),
    ev("exports", 1, day(2, 0)), ev("ai_chat", 1, day(8, 0))];
  const laptop = [ev("ai_chat", 2, day(0, 0)), ev("exports", 1, day(5, 0)), ev("ai_chat", 5, day(12, 0))];
  for (const [device, events] of [["ada-iphone", phone], ["ada-macbook", laptop]]) {
    const r = await api("POST", "/v1/sync", ada, { protocol: 2, device_id: device, external_id: ADA, events });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.accepted.length, events.length);
  }
  const g = await api("POST", "/v1/admin/grants", jwt(ADMIN), { subject: ADA, credits: 40, reason: "welcome" });
  assert.equal(g.status, 201, JSON.stringify(g.body));
  const e = await api("GET", "/v1/entitlements", ada);
  assert.equal(e.body.plan, "free");
  return { ada, todayChat: 5, totalChat: 17 };
}

test("an operator signs in, finds a user, reads the usage chart, grants and revokes access", async () => {
  const { ada, todayChat, totalChat } = await seed();
  const { context, page, violations } = await openPage();

  // Sign in: /console sends us to the form; a wrong token is refused, the admin's accepted.
  await page.goto(base + "/console");
  assert.match(page.url(), /\/console\/sign-in$/);
  await page.fill("#token", "not-a-token");
  await page.click("#sign-in button[type=submit]");
  assert.ok(await page.isVisible("#sign-in-error"));
  await page.fill("#token", jwt(ADMIN));
  await page.click("#sign-in button[type=submit]");
  await page.waitForURL(/\/console\/users$/);
  const cookies = await context.cookies(base + "/console/users");
  const session = cookies.find((c) => c.name === "tally_console");
  assert.ok(session, "a session cookie");
  assert.equal(session.httpOnly, true);
  assert.equal(session.sameSite, "Strict");
  assert.equal(session.path, "/console");

  // Find Ada by the start of her email, open her page.
  await page.fill("#q", "ada@");
  await page.click("form.search button");
  await page.waitForSelector("#users tbody tr");
  assert.equal(await page.locator("#users tbody tr").count(), 1);
  await page.click("#users tbody tr a");
  await page.waitForURL(/\/console\/users\/[0-9a-f-]{36}$/);
  assert.equal((await page.textContent("#plan")).trim(), "free");
  assert.equal((await page.textContent("#credit-balance")).trim(), "40");
  assert.equal(await page.locator("#devices tbody tr").count(), 2);

  // The chart: one uPlot canvas per feature, drawn, holding the seeded days and the limit.
  await page.waitForSelector("#chart-ai_chat[data-rendered=true]");
  const chat = await page.$eval("#chart-ai_chat", (fig) => {
    const canvas = fig.querySelector("canvas");
    const ctx = canvas.getContext("2d");
    const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let inked = 0;
    for (let i = 3; i < px.length; i += 4) if (px[i] > 0) inked += 1;
    return { width: canvas.width, height: canvas.height, inked, series: JSON.parse(fig.dataset.series),
      legend: [...fig.querySelectorAll(".u-legend .u-label")].map((l) => l.textContent) };
  });
  assert.ok(chat.width > 300 && chat.height > 100, `canvas ${chat.width}x${chat.height}`);
  assert.ok(chat.inked > 500, `the canvas is drawn on (${chat.inked} pixels)`);
  assert.equal(chat.series.days, 30);
  assert.equal(chat.series.limit, 20);
  assert.equal(chat.series.daily.at(-1), todayChat, "today's uses from both devices");
  assert.equal(chat.series.daily.reduce((a, b) => a + b, 0), totalChat);
  assert.deepEqual(chat.legend, ["per day", "used this month", "limit"]);
  const exportsSeries = await page.$eval("#chart-exports", (fig) => JSON.parse(fig.dataset.series));
  assert.equal(exportsSeries.limit, 3);
  assert.deepEqual(exportsSeries.used, exportsSeries.daily, "a daily window is the day itself");
  assert.equal(await page.locator("#chart-images canvas").count(), 1, "credit features are charted too");
  assert.equal(await page.locator("#chart-sharing").count(), 0, "flags are not");

  // 90 days.
  await page.click("text=90 days");
  await page.waitForSelector("#chart-ai_chat[data-rendered=true]");
  assert.equal(await page.$eval("#chart-ai_chat", (f) => JSON.parse(f.dataset.series).days), 90);
  await page.click("text=30 days");
  await page.waitForSelector("#chart-ai_chat[data-rendered=true]");

  // Grant Pro: the page and the API both show it.
  await page.selectOption("#grant-plan", "pro");
  await page.fill("#grant-reason", "support");
  await page.click("#grant-form button[type=submit]");
  await page.waitForSelector("#grants tbody tr");
  assert.equal((await page.textContent("#plan")).trim(), "pro");
  assert.equal((await page.textContent("#access-reason")).trim(), "granted:support");
  let e = await api("GET", "/v1/entitlements", ada);
  assert.equal(e.body.plan, "pro");
  assert.equal(e.body.access_reason, "granted:support");
  assert.ok((await page.textContent("#grants tbody tr")).includes(ADMIN), "granted_by is the operator");
  await page.waitForSelector("#chart-ai_chat[data-rendered=true]");
  assert.equal(await page.$eval("#chart-ai_chat", (f) => JSON.parse(f.dataset.series).limit), 60, "the chart follows the new plan");

  mkdirSync(dirname(screenshot), { recursive: true });
  await page.screenshot({ path: screenshot, fullPage: true });

  // Revoke it: back to free, through the API too.
  await page.click("#grants tbody tr button.danger");
  await page.waitForSelector("#grants tbody tr");
  assert.equal((await page.textContent("#plan")).trim(), "free");
  e = await api("GET", "/v1/entitlements", ada);
  assert.equal(e.body.plan, "free");

  // The plans page lists the catalog and its products.
  await page.click("nav >> text=Plans");
  await page.waitForSelector("#plan-pro");
  assert.equal(await page.locator("#products tbody tr").count(), 2);

  // Sign out: the session is gone.
  await page.click(".sign-out button");
  await page.waitForURL(/\/console\/sign-in$/);
  await page.goto(base + "/console/users");
  assert.match(page.url(), /\/console\/sign-in$/);

  assert.deepEqual(violations, [], "no CSP violation and no script error");
  await context.close();
});

/** A webhook receiver on 127.0.0.1 answering `status` (changeable); records every request. */
function startReceiver() {
  const got = [];
  const state = { status: 500 };
  const srv = createServer((req, res) => {
    let body = "";
    req.on("data", (c) => { body += c; });
    req.on("end", () => {
      got.push({ id: req.headers["webhook-id"], status: state.status, body });
      res.writeHead(state.status).end();
    });
  });
  return new Promise((done) => srv.listen(0, "127.0.0.1", () => done({ srv, got, state, url: `http://127.0.0.1:${srv.address().port}/hook` })));
}

async function waitFor(what, f) {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const v = await f();
    if (v) return v;
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test("an operator finds a webhook's dead letter and replays it once the receiver is back", async () => {
  const receiver = await startReceiver();
  const admin = jwt(ADMIN);
  try {
    const reg = await api("POST", "/v1/admin/webhooks", admin, { url: receiver.url, events: ["credits.granted"] });
    assert.equal(reg.status, 201, JSON.stringify(reg.body));
    const id = reg.body.id;
    const g = await api("POST", "/v1/admin/grants", admin, { subject: "auth0|hooked", credits: 5, reason: "gift" });
    assert.equal(g.status, 201, JSON.stringify(g.body));
    const [dead] = await waitFor("a dead letter", async () => {
      const d = await api("GET", `/v1/admin/webhooks/${id}/deliveries`, admin);
      return d.body.deliveries.length === 1 && d.body.deliveries[0].state === "dead" ? d.body.deliveries : null;
    });

    const { context, page, violations } = await openPage();
    await page.goto(base + "/console/sign-in");
    await page.fill("#token", admin);
    await page.click("#sign-in button[type=submit]");
    await page.waitForURL(/\/console\/users$/);

    // The list: the endpoint with one dead letter; never its secret.
    await page.click("nav >> text=Webhooks");
    await page.waitForSelector(`#webhooks tr[data-endpoint="${id}"]`);
    assert.equal((await page.textContent(`tr[data-endpoint="${id}"] td.dead`)).trim(), "1");
    assert.ok(!(await page.content()).includes(reg.body.secret), "the list never shows the signing secret");

    // The endpoint's page: the dead delivery and its attempts, each answered 500.
    await page.click(`tr[data-endpoint="${id}"] a`);
    await page.waitForURL(new RegExp(`/console/webhooks/${id}$`));
    const row = `tr[data-event="${dead.event_id}"]`;
    assert.equal(await page.getAttribute(row, "data-state"), "dead");
    assert.match(await page.textContent(`${row} td.last`), /500/);
    assert.ok(!(await page.content()).includes(reg.body.secret), "the endpoint's page never shows the signing secret");

    // The receiver is back: replay every dead letter; the page shows it delivered.
    receiver.state.status = 200;
    await page.click("#replay-dead button");
    await page.waitForURL(new RegExp(`/console/webhooks/${id}$`));
    await waitFor("the replayed delivery on the page", async () => {
      await page.reload();
      return (await page.getAttribute(row, "data-state")) === "delivered";
    });
    assert.equal(await page.locator("#replay-dead").count(), 0, "no dead letter left");
    const ok = receiver.got.filter((r) => r.id === dead.event_id && r.status === 200);
    assert.equal(ok.length, 1, "the receiver took the replayed event once");
    assert.equal(JSON.parse(ok[0].body).type, "credits.granted");

    assert.deepEqual(violations, [], "no CSP violation and no script error");
    await context.close();
  } finally {
    receiver.srv.close();
  }
});
