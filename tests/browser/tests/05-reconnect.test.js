// The page's stream breaks: the replica serving it dies, then a replica's
// database listener is killed. The page says so, comes back by itself and
// ends up equal to the snapshot, changes made meanwhile included.

import assert from "node:assert/strict";
import test from "node:test";
import { api, figure, newPage, openSchedule, pageMap, waitFor, withSetup } from "../lib/harness.js";

async function converged(page, base, id, timeout = 15000) {
  const t0 = Date.now();
  let last;
  await waitFor(
    "the page's map to equal the snapshot",
    async () => {
      const [p, snap] = await Promise.all([pageMap(page), api.snapshotMap(base, id)]);
      last = { page: p, snapshot: snap };
      return JSON.stringify(sorted(p)) === JSON.stringify(sorted(snap));
    },
    { timeout, interval: 50 },
  ).catch((e) => {
    throw new Error(`${e.message}\n${JSON.stringify(last)}`);
  });
  return { ms: Date.now() - t0, seats: Object.keys(last.snapshot).length };
}

const sorted = (o) => Object.fromEntries(Object.entries(o).sort());

/** A few holds, a sale and a cancel through `base`, as other users. */
async function changes(base, id, row) {
  const t1 = await api.guest(base);
  const t2 = await api.guest(base);
  const t3 = await api.guest(base);
  const b1 = await api.start(base, t1, id, [
    [row, 1],
    [row, 2],
  ]);
  assert.equal(b1.status, 201);
  assert.equal((await api.confirm(base, t1, b1.body.bookingId)).status, 200);
  const b2 = await api.start(base, t2, id, [[row, 4]]);
  assert.equal(b2.status, 201);
  const b3 = await api.start(base, t3, id, [
    [row, 6],
    [row, 7],
  ]);
  assert.equal(b3.status, 201);
  assert.equal((await api.cancel(base, t3, b3.body.bookingId)).status, 200);
}

test("5. a cut stream: reconnecting, live again, and the map equals the snapshot", { timeout: 120000 }, () =>
  withSetup(async (s) => {
    // The listener failures below are intended; keep their warnings out of the output.
    const quiet = { RUST_LOG: "error" };
    const r1 = await s.replica(quiet);
    const r2 = await s.replica(quiet);
    const proxy = await s.proxy(r1.base);
    const { id } = await api.createSchedule(r2.base, { rows: 10, cols: 10 });
    const browser = await s.browser();
    const page = await newPage(await browser.newContext(), s.problems);
    await changes(r2.base, id, 1);
    await openSchedule(page, proxy.base, id);
    await converged(page, r2.base, id);

    // The replica behind the page dies.
    let t0 = Date.now();
    await r1.kill("SIGKILL");
    await page.waitForSelector('#connection[data-state="reconnecting"]', { timeout: 10000 });
    const noticed = Date.now() - t0;
    assert.equal((await page.textContent("#connection")).trim(), "Reconnecting…");
    await changes(r2.base, id, 2);
    await changes(r2.base, id, 3);
    // Its traffic moves to the surviving replica, as a load balancer would.
    t0 = Date.now();
    proxy.switchTo(r2.base);
    await page.waitForSelector('#connection[data-state="live"]', { timeout: 15000 });
    const back = Date.now() - t0;
    const c1 = await converged(page, r2.base, id);
    figure(`replica killed: "reconnecting" after ${noticed} ms; "live" again ${back} ms after the switch (EventSource retry 3 s); map = snapshot (${c1.seats} taken seats) ${c1.ms} ms later`);

    // The listener connections are killed while changes go through another replica.
    const r3 = await s.replica(quiet);
    for (let round = 1; round <= 3; round++) {
      const killed = await s.db.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'seatsync-listener' AND datname = $1",
        [s.db.name],
      );
      t0 = Date.now();
      await changes(r3.base, id, 3 + round);
      const c = await converged(page, r3.base, id);
      figure(`listener round ${round}: ${killed.rowCount} listener backends terminated; changes through another replica on the page ${Date.now() - t0} ms after they began (${c.seats} taken seats, page ${await page.getAttribute("#connection", "data-state")})`);
    }
  }),
);

test("5b. resuming from before the retained event log: resync, the snapshot is reloaded, the map is right", { timeout: 60000 }, () =>
  withSetup(async (s) => {
    // Events older than a second are pruned, so a page away for longer
    // cannot be replayed to and must be told to resync.
    const r = await s.replica({ EVENT_RETENTION_SECONDS: "1", RUST_LOG: "error" });
    const proxy = await s.proxy(r.base);
    const { id } = await api.createSchedule(r.base, { rows: 10, cols: 10 });
    const browser = await s.browser();
    const context = await browser.newContext();
    let snapshots = 0;
    context.on("request", (q) => {
      if (q.url().includes("/seat-status")) snapshots++;
    });
    const page = await newPage(context, s.problems);
    await changes(r.base, id, 1);
    await openSchedule(page, proxy.base, id);
    await converged(page, r.base, id);
    assert.equal(snapshots, 1);

    // The page loses its server; meanwhile seats change and the log is pruned.
    proxy.switchTo("http://127.0.0.1:9");
    proxy.cut();
    await page.waitForSelector('#connection[data-state="reconnecting"]', { timeout: 10000 });
    await changes(r.base, id, 2);
    await waitFor("the event log to be pruned", async () => (await s.db.query("SELECT count(*)::int AS n FROM seat_events")).rows[0].n === 0, { timeout: 15000, interval: 200 });

    const t0 = Date.now();
    proxy.switchTo(r.base);
    await page.waitForSelector('#connection[data-state="live"]', { timeout: 15000 });
    const c = await converged(page, r.base, id);
    figure(`resync: live again ${Date.now() - t0 - c.ms} ms after the server came back, snapshot reloaded (${snapshots} snapshot requests in all), map = snapshot (${c.seats} taken seats)`);
    assert.equal(snapshots, 2, "the resync reloaded the snapshot once");
  }),
);
