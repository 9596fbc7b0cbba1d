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

test("4b. a second tab of the same viewer gets the pending booking back (409 booking_in_progress); the countdown ignores a wrong clock", { timeout: 60000 }, () =>
  withSetup(async (s) => {
    const r = await s.replica({ HOLD_SECONDS: "120" });
    const { id } = await api.createSchedule(r.base, { rows: 5, cols: 8 });
    const browser = await s.browser();
    const context = await browser.newContext();
    const first = await newPage(context, s.problems);
    await openSchedule(first, r.base, id);
    await first.click(seatSelector(2, 2));
    await first.click("#pay");
    await waitSeats(first, [[2, 2]], "yours");

    // Same guest (localStorage is shared), new tab (sessionStorage is not),
    // and this tab's clock is ten minutes slow.
    const second = await newPage(context, s.problems);
    await second.clock.setSystemTime(Date.now() - 10 * 60 * 1000);
    await openSchedule(second, r.base, id);
    await second.click(seatSelector(4, 5));
    await second.click("#pay");
    await waitText(second, "#message", /already have seats on hold for this showing: Row 2, seat 2/);
    await waitSeats(second, [[2, 2]], "yours");
    await waitSeats(second, [[4, 5]], "selected");
    const slow = Date.now() - (await second.evaluate(() => Date.now()));
    assert.ok(slow > 590000, `the tab's clock is ${slow} ms slow`);
    const left = seconds(await second.textContent("#countdown"));
    figure(`second tab: "${(await second.textContent("#message")).trim()}"; countdown ${left} s with the tab's clock 600 s slow`);
    assert.ok(left > 100 && left <= 120, `countdown ${left} s, not shifted by the clock error`);
    assert.equal((await s.db.query("SELECT count(*)::int AS n FROM bookings")).rows[0].n, 1);
  }),
);
