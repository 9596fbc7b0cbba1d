// Two viewers on one showing, each through its own replica: every change
// one makes is on the other's map within a second.

import assert from "node:assert/strict";
import test from "node:test";
import { api, figure, newPage, openSchedule, seatSelector, waitSeats, waitText, withSetup } from "../lib/harness.js";

const HOLD_SECONDS = 4;

test("1. holds, sales, cancels and expiry reach a viewer on another replica", { timeout: 120000 }, () =>
  withSetup(async (s) => {
    // A's replica holds for only a few seconds, so the expiry step is short;
    // the confirm and cancel steps finish well inside that.
    const ra = await s.replica({ HOLD_SECONDS: String(HOLD_SECONDS) });
    const rb = await s.replica();
    const { id } = await api.createSchedule(ra.base, { rows: 6, cols: 10, blocked: [{ row: 1, col: 1 }] });
    const browser = await s.browser();
    const a = await newPage(await browser.newContext(), s.problems);
    const b = await newPage(await browser.newContext(), s.problems);
    await openSchedule(a, ra.base, id);
    await openSchedule(b, rb.base, id);

    // Hold: A selects two seats (no request) and pays.
    const first = [
      [2, 4],
      [2, 5],
    ];
    for (const [r, c] of first) await a.click(seatSelector(r, c));
    assert.equal((await a.textContent("#summary")).trim(), "2 of 4 selected");
    let t0 = Date.now();
    await a.click("#pay");
    await waitSeats(a, first, "yours");
    const aHeld = Date.now() - t0;
    await waitSeats(b, first, "held", 5000);
    const bHeld = Date.now() - t0;
    figure(`held: yours on A ${aHeld} ms after Pay, held on B ${bHeld} ms after Pay (${bHeld - aHeld} ms after A's 201)`);
    assert.ok(bHeld - aHeld < 1000, `B saw the hold ${bHeld - aHeld} ms after A had it`);

    // Confirm -> sold on both.
    t0 = Date.now();
    await a.click("#confirm");
    await waitSeats(b, first, "sold", 5000);
    const bSold = Date.now() - t0;
    await waitSeats(a, first, "sold");
    await waitText(a, "#message", /Payment complete/);
    figure(`sold seen on B ${bSold} ms after A pressed Complete payment`);
    assert.ok(bSold < 1000);

    // Another booking, cancelled -> available again on B.
    const second = [
      [3, 1],
      [3, 2],
    ];
    for (const [r, c] of second) await a.click(seatSelector(r, c));
    await a.click("#pay");
    await waitSeats(b, second, "held", 5000);
    t0 = Date.now();
    await a.click("#cancel");
    await waitSeats(b, second, "available", 5000);
    const bFree = Date.now() - t0;
    await waitText(a, "#message", /Booking cancelled/);
    figure(`available again on B ${bFree} ms after A pressed Cancel`);
    assert.ok(bFree < 1000);

    // A hold left to expire: released on both, and A is told.
    const third = [
      [4, 7],
      [4, 8],
    ];
    for (const [r, c] of third) await a.click(seatSelector(r, c));
    await a.click("#pay");
    await waitSeats(a, third, "yours");
    const heldAt = Date.now();
    await waitSeats(b, third, "held", 5000);
    await waitText(a, "#message", /hold expired/, (HOLD_SECONDS + 5) * 1000);
    const told = Date.now() - heldAt;
    await waitSeats(a, third, "available", 5000);
    await waitSeats(b, third, "available", 5000);
    const released = Date.now() - heldAt;
    figure(`expiry (HOLD_SECONDS=${HOLD_SECONDS}): A told after ${told} ms, released on A and B ${released} ms after the hold`);
    assert.ok(released < (HOLD_SECONDS + 3) * 1000);
  }),
);
