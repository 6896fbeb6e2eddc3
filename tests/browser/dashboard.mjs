// Drives the live dashboard (GET /dashboard) of a running hookbridge in Debian's Chromium, end to end:
// the page connects to /live/dashboard, a NEW_TIMER_STARTED webhook makes a running timer appear (without a
// reload) and tick, a TIMER_STOPPED webhook for the same entry removes it and raises the user's total today.
//
//   node tests/browser/dashboard.mjs --base-url http://127.0.0.1:8082 --webhook-url http://127.0.0.1:8080 \
//     --secret <clockify secret> \
//     --started tests/fixtures/clockify/NEW_TIMER_STARTED.json \
//     --stopped tests/fixtures/captured/TIMER_STOPPED__jpweijers-odoo-clockify.json \
//     --screenshot target/test-output/dashboard.png
//
// --base-url is the internal listener (the page and its event stream), --webhook-url the webhook listener
// (default: the base URL). Each flag can also come from the environment: HOOKBRIDGE_URL, HOOKBRIDGE_WEBHOOK_URL, CLOCKIFY_SECRET, STARTED_FIXTURE,
// STOPPED_FIXTURE, SCREENSHOT; CHROMIUM overrides /usr/bin/chromium. The daemon must route the Clockify source
// to the dashboard plugin (default channel `dashboard`). Prints one line of JSON; exits non-zero with a message
// on any failure. Every wait is bounded. Also saves `<screenshot>-running.png` while the timer runs.

import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

const WAIT_MS = 10_000;
const TICK_MS = 2_500;

const { values: flags } = parseArgs({
  options: {
    "base-url": { type: "string", default: process.env.HOOKBRIDGE_URL },
    "webhook-url": { type: "string", default: process.env.HOOKBRIDGE_WEBHOOK_URL },
    secret: { type: "string", default: process.env.CLOCKIFY_SECRET },
    started: { type: "string", default: process.env.STARTED_FIXTURE },
    stopped: { type: "string", default: process.env.STOPPED_FIXTURE },
    screenshot: { type: "string", default: process.env.SCREENSHOT },
  },
});
for (const name of ["base-url", "secret", "started", "stopped", "screenshot"]) {
  if (!flags[name]) fail(`missing --${name} (see the usage at the top of ${import.meta.url})`);
}
const baseUrl = flags["base-url"].replace(/\/+$/, "");
const webhookUrl = (flags["webhook-url"] ?? baseUrl).replace(/\/+$/, "");

function fail(message) {
  console.error(`dashboard browser test FAILED: ${message}`);
  process.exit(1);
}

/** Runs `promise`, turning a timeout or error into a failure that says what we were waiting for. */
async function step(what, promise) {
  try {
    return await promise;
  } catch (err) {
    throw new Error(`${what}: ${err.message.split("\n")[0]}`);
  }
}

/** Two timestamps on today's UTC date: start about 2 hours ago (not before midnight), end 90 minutes later. */
function todaysInterval() {
  const now = Date.now();
  const midnight = new Date(new Date(now).toISOString().slice(0, 10) + "T00:00:00Z").getTime();
  const start = Math.max(midnight, now - 2 * 3600_000);
  const iso = (ms) => new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z"); // Clockify's format
  return { start: iso(start), end: iso(start + 90 * 60_000) };
}

async function postClockify(eventType, body) {
  const response = await step(
    `POST /hooks/clockify (${eventType})`,
    fetch(`${webhookUrl}/hooks/clockify`, {
      method: "POST",
      headers: {
        "clockify-signature": flags.secret,
        "clockify-webhook-event-type": eventType,
        "content-type": "application/json",
      },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(WAIT_MS),
    }),
  );
  if (response.status !== 200) {
    throw new Error(`POST /hooks/clockify (${eventType}) answered ${response.status}: ${await response.text()}`);
  }
}

// The two webhooks: the fixtures, rewritten to today and to the same entry and user.
const { start, end } = todaysInterval();
const started = JSON.parse(readFileSync(flags.started, "utf8"));
// A fresh entry id (24 hex digits, like Clockify's) so that a re-run against the same daemon counts anew.
started.id = String(started.id).slice(0, 12) + Date.now().toString(16).padStart(12, "0").slice(-12);
started.timeInterval = { ...started.timeInterval, start, end: null, duration: null };
const stopped = {
  ...JSON.parse(readFileSync(flags.stopped, "utf8")),
  ...Object.fromEntries(
    ["id", "description", "userId", "user", "projectId", "project", "taskId", "task", "workspaceId"].map((k) => [
      k,
      started[k],
    ]),
  ),
  timeInterval: { start, end, duration: "PT1H30M" },
};
const entryId = started.id;
const userId = started.userId;

const userDataDir = mkdtempSync(join(tmpdir(), "hookbridge-chromium-"));
let context;
const watchdog = setTimeout(() => fail("the whole run took over 60 s"), 60_000);
try {
  context = await step(
    "launching Chromium",
    chromium.launchPersistentContext(userDataDir, {
      executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
      headless: true,
      timeout: 30_000,
      viewport: { width: 1200, height: 800 },
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    }),
  );
  const page = context.pages()[0] ?? (await context.newPage());
  const pageErrors = [];
  page.on("pageerror", (err) => pageErrors.push(err.message));

  await step("opening /dashboard", page.goto(`${baseUrl}/dashboard`, { timeout: WAIT_MS }));
  await step(
    "waiting for the page to connect to /live/dashboard",
    page.waitForSelector('#status[data-state="open"]', { timeout: WAIT_MS }),
  );
  const userBar = `#users [data-user-id="${userId}"]`;
  const secondsBefore = Number((await page.locator(userBar).getAttribute("data-seconds", { timeout: 200 }).catch(() => 0)) ?? 0);

  await postClockify("NEW_TIMER_STARTED", started);
  const row = `#running [data-entry-id="${entryId}"]`;
  await step("waiting for the running timer to appear (no reload)", page.waitForSelector(row, { timeout: WAIT_MS }));
  const elapsedBefore = await page.locator(`${row} .elapsed`).textContent();
  await step(
    `waiting for the elapsed time (${elapsedBefore}) to tick`,
    page.waitForFunction(
      ([selector, before]) => document.querySelector(selector)?.textContent !== before,
      [`${row} .elapsed`, elapsedBefore],
      { timeout: TICK_MS },
    ),
  );
  const elapsedAfter = await page.locator(`${row} .elapsed`).textContent();
  await page.screenshot({ path: flags.screenshot.replace(/(\.png)?$/, "-running.png"), fullPage: true });

  await postClockify("TIMER_STOPPED", stopped);
  await step("waiting for the stopped timer to disappear", page.waitForSelector(row, { state: "detached", timeout: WAIT_MS }));
  await step(
    `waiting for the user's total to grow past ${secondsBefore} s`,
    page.waitForFunction(
      ([selector, before]) => Number(document.querySelector(selector)?.dataset.seconds ?? 0) > before,
      [userBar, secondsBefore],
      { timeout: WAIT_MS },
    ),
  );
  const secondsAfter = Number(await page.locator(userBar).getAttribute("data-seconds"));
  await page.screenshot({ path: flags.screenshot, fullPage: true });
  if (pageErrors.length) throw new Error(`the page threw: ${pageErrors.join("; ")}`);

  console.log(
    JSON.stringify({
      ok: true,
      entryId,
      userId,
      elapsed: [elapsedBefore, elapsedAfter],
      secondsBefore,
      secondsAfter,
      screenshot: flags.screenshot,
    }),
  );
} catch (err) {
  await context?.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
  fail(err.message);
}
clearTimeout(watchdog);
await context.close().catch(() => {});
rmSync(userDataDir, { recursive: true, force: true });
