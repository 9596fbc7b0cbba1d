// Someone else holds one of B's chosen seats before B pays, and B's stream
// has not told B yet: the 409 itself must explain it, mark exactly that seat
// unavailable and keep the rest of B's selection.

import assert from "node:assert/strict";
import test from "node:test";
import { api, figure, newPage, openSchedule, seatSelector, waitSeats, waitText, withSetup } from "../lib/harness.js";

test("2. a seat taken under B's selection: conflict sentence, that seat unavailable, the rest kept", { timeout: 60000 }, () =>
  withSetup(async (s) => {
    const ra = await s.replica();
    const rb = await s.replica();
    // B talks to its replica through a proxy that can hold back B's stream,
    // so B's Pay meets the conflict rather than an already-updated map.
    const proxy = await s.proxy(rb.base);
    const { id } = await api.createSchedule(ra.base, { rows: 5, cols: 10 });
    const browser = await s.browser();
    const a = await newPage(await browser.newContext(), s.problems);
    const b = await newPage(await browser.newContext(), s.problems);
    await openSchedule(a, ra.base, id);
    await openSchedule(b, proxy.base, id);

    const mine = [
      [1, 5],
      [1, 6],
      [1, 7],
    ];
    for (const [r, c] of mine) await b.click(seatSelector(r, c));
    assert.equal((await b.textContent("#summary")).trim(), "3 of 4 selected");

    proxy.pauseStreams();
    await a.click(seatSelector(1, 6));
    await a.click("#pay");
    await waitSeats(a, [[1, 6]], "yours");
    // B's stream is held back: B still believes its three seats are free.
    await waitSeats(b, mine, "selected");

    const t0 = Date.now();
    await b.click("#pay");
    await waitText(b, "#message", /Row 1, seat 6 was just taken/);
    const said = Date.now() - t0;
    await waitSeats(b, [[1, 6]], "held");
    await waitSeats(b, [
      [1, 5],
      [1, 7],
    ], "selected");
    assert.equal((await b.textContent("#summary")).trim(), "2 of 4 selected");
    const text = (await b.textContent("#message")).trim();
    figure(`B told ${said} ms after Pay: "${text}"`);
    assert.match(text, /rest of your selection is kept/);

    // With the stream flowing again B holds the rest.
    proxy.resumeStreams();
    await b.click("#pay");
    await waitSeats(b, [
      [1, 5],
      [1, 7],
    ], "yours");
    await waitSeats(a, [
      [1, 5],
      [1, 7],
    ], "held", 5000);
    figure("B then held the two seats it kept");
  }),
);

test("2b. Pay whose answer is lost: the page says it is retrying and the retry makes no second booking", { timeout: 60000 }, () =>
  withSetup(async (s) => {
    const r = await s.replica();
    const proxy = await s.proxy(r.base);
    const { id } = await api.createSchedule(r.base, { rows: 3, cols: 6 });
    const browser = await s.browser();
    const page = await newPage(await browser.newContext(), s.problems);
    await openSchedule(page, proxy.base, id);
    await page.click(seatSelector(2, 2));
    await page.click(seatSelector(2, 3));

    // The server holds the seats, but the 201 never reaches the page (twice).
    proxy.dropResponses("/api/bookings/start", 2);
    const t0 = Date.now();
    await page.dblclick("#pay");
    await waitText(page, "#message", /retrying/);
    const said = (await page.textContent("#message")).trim();
    await waitSeats(page, [
      [2, 2],
      [2, 3],
    ], "yours");
    const held = Date.now() - t0;
    const rows = (await s.db.query("SELECT count(*)::int AS n FROM bookings")).rows[0].n;
    const keys = (await s.db.query("SELECT count(DISTINCT idempotency_key)::int AS n FROM bookings")).rows[0].n;
    figure(`lost answers: page said "${said}", held ${held} ms after a double click; ${rows} booking (${keys} idempotency key) in the database`);
    assert.equal(rows, 1);
  }),
);
