// A reload in the middle of paying must not lose the hold: the guest token
// (localStorage) and the pending booking id (sessionStorage) bring it back.

import assert from "node:assert/strict";
import test from "node:test";
import { api, figure, newPage, openSchedule, seatSelector, waitSeats, waitText, withSetup } from "../lib/harness.js";

const seconds = (t) => {
  const [m, s] = t.trim().split(":").map(Number);
  return m * 60 + s;
};

test("4. reload during a hold brings back the booking and its countdown", { timeout: 60000 }, () =>
  withSetup(async (s) => {
    const r = await s.replica({ HOLD_SECONDS: "120" });
    const { id } = await api.createSchedule(r.base, { rows: 5, cols: 8 });
    const browser = await s.browser();
    const page = await newPage(await browser.newContext(), s.problems);
    await openSchedule(page, r.base, id);

    const seats = [
      [3, 3],
      [3, 4],
    ];
    for (const [row, col] of seats) await page.click(seatSelector(row, col));
    await page.click("#pay");
    await waitSeats(page, seats, "yours");
    await page.waitForSelector("#payment:not([hidden])");
    const before = seconds(await page.textContent("#countdown"));
    const bookingsBefore = await s.db.query("SELECT count(*)::int AS n FROM bookings");

    const t0 = Date.now();
    await page.reload();
    await page.waitForSelector("#payment:not([hidden])", { timeout: 10000 });
    await waitSeats(page, seats, "yours");
    await waitText(page, "#message", /Your hold is back: Row 3, seats 3 and 4/);
    const restored = Date.now() - t0;
    const after = seconds(await page.textContent("#countdown"));
    figure(`hold restored ${restored} ms after reload; countdown ${before} s before, ${after} s after`);
    assert.ok(after <= before && after > before - 10, `countdown ${before} -> ${after}`);
    assert.equal((await page.textContent("#held-seats")).trim(), "Row 3, seats 3 and 4");

    // Still the same booking: paying it works and no second booking exists.
    await page.click("#confirm");
    await waitSeats(page, seats, "sold");
    const bookingsAfter = await s.db.query("SELECT count(*)::int AS n, count(*) FILTER (WHERE status = 'CONFIRMED')::int AS paid FROM bookings");
    assert.equal(bookingsAfter.rows[0].n, bookingsBefore.rows[0].n);
    assert.equal(bookingsAfter.rows[0].paid, 1);
    figure(`after reload: the same booking was paid (${bookingsAfter.rows[0].n} booking in the database)`);
  }),
);
