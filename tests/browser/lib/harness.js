// Test plumbing: a database per test, real seatsync replica processes, a
// switchable HTTP proxy, Debian's Chromium driven by playwright-core, and
// API helpers. Everything waits on conditions with deadlines, never sleeps.

import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import pg from "pg";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, "../../..");
export const AUTH_SECRET = "browser-test-secret-0123456789-abcdef";
export const ADMIN_TOKEN = "browser-test-admin-token-0123456789";
const ADMIN_URL = process.env.SEATSYNC_TEST_DATABASE_URL || "postgres://postgres@127.0.0.1:5432/postgres";
const BIN = path.resolve(REPO, process.env.SEATSYNC_BIN || "target/debug/seatsync");
const CHROMIUM = process.env.CHROMIUM_BIN || "/usr/bin/chromium";

/** Polls `check` until it returns a truthy value; throws naming `what` at the deadline. */
export async function waitFor(what, check, { timeout = 10000, interval = 20 } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() >= deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}${last ? `: ${last.message}` : ""}`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

// ---- databases ----

export async function createDb() {
  const name = `seatsync_browser_${randomBytes(6).toString("hex")}`;
  const admin = new pg.Client({ connectionString: ADMIN_URL });
  await admin.connect();
  try {
    await admin.query(`CREATE DATABASE ${name}`);
  } finally {
    await admin.end();
  }
  const url = new URL(ADMIN_URL);
  url.pathname = `/${name}`;
  return {
    name,
    url: url.toString(),
    async query(sql, params) {
      const c = new pg.Client({ connectionString: url.toString() });
      await c.connect();
      try {
        return await c.query(sql, params);
      } finally {
        await c.end();
      }
    },
    async drop() {
      const c = new pg.Client({ connectionString: ADMIN_URL });
      await c.connect();
      try {
        await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      } finally {
        await c.end();
      }
    },
  };
}

// ---- replicas ----

/** Starts `seatsync serve` on a free port and waits until /readyz says 200. */
export async function spawnReplica(db, env = {}) {
  const child = spawn(BIN, ["serve"], {
    env: {
      PATH: process.env.PATH,
      DATABASE_URL: db.url,
      AUTH_SECRET,
      ADMIN_TOKEN,
      HOST: "127.0.0.1",
      PORT: "0",
      SWEEP_INTERVAL_MS: "200",
      DB_POOL_SIZE: "4",
      RUST_LOG: process.env.SEATSYNC_TEST_LOG || "warn",
      ...env,
    },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const base = await new Promise((resolve, reject) => {
    let buf = "";
    const timer = setTimeout(() => reject(new Error("replica did not start within 30 s")), 30000);
    child.once("exit", (code, signal) => reject(new Error(`seatsync exited (${signal || code}) before listening`)));
    child.stdout.on("data", (chunk) => {
      buf += chunk;
      const m = buf.match(/seatsync listening on (\S+)/);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
  });
  // Keep draining stdout so the child never blocks on a full pipe.
  child.stdout.resume();
  let stopping = false;
  // A replica that dies on its own (or is killed from outside the test)
  // explains the failures that follow; say so.
  child.once("exit", (code, signal) => {
    if (!stopping) console.error(`  replica ${base} exited unexpectedly (${signal || code})`);
  });
  const replica = {
    base,
    child,
    url: (p) => base + p,
    async kill(signal = "SIGKILL") {
      if (child.exitCode !== null || child.signalCode !== null) return;
      stopping = true;
      const exited = new Promise((r) => child.once("exit", r));
      child.kill(signal);
      await exited;
    },
  };
  await waitFor("replica ready", async () => (await fetch(replica.url("/readyz"))).status === 200, { timeout: 20000 });
  return replica;
}

// ---- a proxy in front of replicas, to move or cut the page's connections ----

/**
 * An HTTP proxy the page talks to. `target` can be switched between
 * replicas; `cut()` drops every open connection; `pauseStreams()` holds back
 * what SSE streams send (the page then learns of changes only through its
 * own requests).
 */
export async function startProxy(target) {
  const sockets = new Set();
  const upstreams = new Set();
  const held = [];
  const drops = [];
  const proxy = {
    target: new URL(target),
    streamsPaused: false,
    base: "",
    switchTo(t) {
      proxy.target = new URL(t);
    },
    cut() {
      for (const u of upstreams) u.destroy();
      for (const s of sockets) s.destroy();
    },
    /** The next `n` responses to requests whose path starts with `prefix` are lost after the server handled them. */
    dropResponses(prefix, n = 1) {
      drops.push({ prefix, n });
    },
    pauseStreams() {
      proxy.streamsPaused = true;
    },
    resumeStreams() {
      proxy.streamsPaused = false;
      for (const [res, chunk] of held.splice(0)) if (!res.destroyed) res.write(chunk);
    },
  };
  const server = http.createServer((req, res) => {
    const t = proxy.target;
    const up = http.request(
      { host: t.hostname, port: t.port, method: req.method, path: req.url, headers: req.headers, agent: false },
      (ur) => {
        const drop = drops.find((d) => d.n > 0 && req.url.startsWith(d.prefix));
        if (drop) {
          // Headers arrive, the body never does: the browser cannot retry
          // this by itself, so the page sees a failed request.
          drop.n--;
          ur.resume();
          res.writeHead(ur.statusCode, ur.headers);
          res.flushHeaders();
          setTimeout(() => res.socket && res.socket.destroy(), 20);
          return;
        }
        res.writeHead(ur.statusCode, ur.headers);
        const isStream = req.url.includes("/seats/stream");
        ur.on("data", (chunk) => {
          if (isStream && proxy.streamsPaused) held.push([res, chunk]);
          else res.write(chunk);
        });
        ur.on("end", () => res.end());
        ur.on("error", () => res.destroy());
      },
    );
    upstreams.add(up);
    up.on("close", () => upstreams.delete(up));
    // An unreachable replica looks like a network failure to the browser.
    up.on("error", () => res.destroy());
    res.on("close", () => up.destroy());
    req.pipe(up);
  });
  server.on("connection", (s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  proxy.base = `http://127.0.0.1:${server.address().port}`;
  proxy.close = async () => {
    proxy.cut();
    await new Promise((r) => server.close(r));
  };
  return proxy;
}

// ---- the browser ----

/**
 * Debian's Chromium, headless; playwright-core never downloads a browser.
 * launch() gives every run a new, empty profile directory.
 */
export async function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/** A page that fails the test on uncaught errors and CSP violations. */
export async function newPage(context, problems = []) {
  const page = await context.newPage();
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" && /Content Security Policy|Refused to/i.test(m.text())) problems.push(`console: ${m.text()}`);
  });
  return page;
}

export const seatSelector = (row, col) => `#grid button[aria-label^="Row ${row}, seat ${col},"]`;

/** The state word of a seat's aria-label ("available", "held", ...). */
export async function seatState(page, row, col) {
  const label = await page.getAttribute(seatSelector(row, col), "aria-label");
  return label && label.split(", ").pop();
}

/**
 * Waits, polling inside the page on every frame, until every seat has the
 * wanted state; resolves with the milliseconds it took.
 */
export async function waitSeats(page, seats, state, timeout = 10000) {
  const t0 = Date.now();
  await page.waitForFunction(
    ({ seats, state }) =>
      seats.every(([r, c]) => {
        const b = document.querySelector(`#grid button[aria-label^="Row ${r}, seat ${c},"]`);
        return b && b.getAttribute("aria-label").endsWith(`, ${state}`);
      }),
    { seats, state },
    { timeout, polling: "raf" },
  );
  return Date.now() - t0;
}

export async function waitText(page, selector, re, timeout = 10000) {
  const t0 = Date.now();
  await page.waitForFunction(
    ({ selector, source, flags }) => new RegExp(source, flags).test(document.querySelector(selector)?.textContent || ""),
    { selector, source: re.source, flags: re.flags },
    { timeout, polling: "raf" },
  );
  return Date.now() - t0;
}

/** Every seat's state on the page, keyed "r:c", only the non-free ones. */
export async function pageMap(page) {
  return page.$$eval("#grid button", (bs) => {
    const out = {};
    for (const b of bs) {
      const m = b.getAttribute("aria-label").match(/^Row (\d+), seat (\d+), (\w+)$/);
      if (m && m[3] !== "available" && m[3] !== "blocked" && m[3] !== "selected") out[`${m[1]}:${m[2]}`] = m[3] === "yours" ? "held" : m[3];
    }
    return out;
  });
}

// ---- the API, as an admin or another user would use it ----

async function call(base, method, p, { token, body, headers = {} } = {}) {
  const h = { ...headers };
  if (token) h.Authorization = `Bearer ${token}`;
  if (body !== undefined) h["Content-Type"] = "application/json";
  const r = await fetch(base + p, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {
    json = text;
  }
  return { status: r.status, body: json, headers: r.headers };
}

export const api = {
  async createSchedule(base, { title = "Test showing", rows = 6, cols = 10, blocked = [], startsAt = "2026-12-24T19:30:00Z" } = {}) {
    const r = await call(base, "POST", "/api/schedules", { token: ADMIN_TOKEN, body: { title, startsAt, rows, cols, blocked } });
    if (r.status !== 201) throw new Error(`create schedule: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body;
  },
  async guest(base) {
    const r = await call(base, "POST", "/api/auth/guest");
    if (r.status !== 201) throw new Error(`guest: ${r.status}`);
    return r.body.token;
  },
  start: (base, token, scheduleId, seats) =>
    call(base, "POST", "/api/bookings/start", { token, body: { scheduleId, seats: seats.map(([row, col]) => ({ row, col })) } }),
  confirm: (base, token, id) => call(base, "POST", `/api/bookings/${id}/confirm`, { token }),
  cancel: (base, token, id) => call(base, "POST", `/api/bookings/${id}/cancel`, { token }),
  /** The snapshot as "r:c" -> held | sold, like pageMap. */
  async snapshotMap(base, scheduleId) {
    const r = await call(base, "GET", `/api/schedules/${scheduleId}/seat-status`);
    const out = {};
    for (const s of r.body.seats) out[`${s.row}:${s.col}`] = s.status === "CONFIRMED" ? "sold" : "held";
    return out;
  },
};

/** Runs `body` with a fresh database, replicas and browser, and cleans up whatever happens. */
export async function withSetup(body) {
  const cleanups = [];
  const db = await createDb();
  cleanups.push(() => db.drop());
  const ctx = {
    db,
    problems: [],
    async replica(env) {
      const r = await spawnReplica(db, env);
      cleanups.push(() => r.kill());
      return r;
    },
    async proxy(target) {
      const p = await startProxy(target);
      cleanups.push(() => p.close());
      return p;
    },
    async browser() {
      const b = await launchBrowser();
      cleanups.push(() => b.close());
      return b;
    },
  };
  try {
    await body(ctx);
  } finally {
    for (const c of cleanups.reverse()) {
      try {
        await c();
      } catch (e) {
        console.error(`cleanup: ${e.message}`);
      }
    }
  }
  if (ctx.problems.length) throw new Error(ctx.problems.join("\n"));
}

/** Opens a showing's seat map and waits until its stream is live. */
export async function openSchedule(page, base, scheduleId, timeout = 15000) {
  await page.goto(`${base}/schedules/${scheduleId}`);
  await page.waitForSelector('#connection[data-state="live"]', { timeout });
}

export const connectionState = (page) => page.getAttribute("#connection", "data-state");
export const message = (page) => page.textContent("#message");

/** Prints a test's figure, so the run's output carries the measurements. */
export function figure(text) {
  console.log(`  ${text}`);
}
