// Confirm and cancel when the booking already ended elsewhere: the server's
// 409 and 410 become sentences, and the page returns to choosing seats.
// The page's stream is held back (proxy) so the page learns it from the answer.

import assert from "node:assert/strict";
import test from "node:test";
import { api, figure, newPage, openSchedule, seatSelector, waitFor, waitSeats, waitText, withSetup } from "../lib/harness.js";

async function holdOne(page, seat) {
  await page.click(seatSelector(...seat));
  await page.click("#pay");
  await waitSeats(page, [seat], "yours");
  const token = await page.evaluate(() => JSON.parse(localStorage.getItem("seatsync.guest")).token);
  const id = await page.evaluate(() => Object.entries(sessionStorage).find(([k]) => k.startsWith("seatsync.booking."))[1]);
  return { token, id };
}

test("9. confirm after a cancel (409), cancel after a sale (409), confirm after expiry (410)", { timeout: 60000 }, () =>
  withSetup(async (s) => {
    const r = await s.replica({ HOLD_SECONDS: "4" });
    const proxy = await s.proxy(r.base);
    const { id } = await api.createSchedule(r.base, { rows: 3, cols: 6 });
    const browser = await s.browser();
    const page = await newPage(await browser.newContext(), s.problems);
    // Fake timers (time still runs) so the countdown can be frozen below.
    await page.clock.install();
    await openSchedule(page, proxy.base, id);
    proxy.pauseStreams();

    let b = await holdOne(page, [1, 1]);
    assert.equal((await api.cancel(r.base, b.token, b.id)).status, 200);
    await page.click("#confirm");
    await waitText(page, "#message", /cancelled before the payment went through/);
    figure(`confirm after cancel: "${(await page.textContent("#message")).trim()}"`);

    b = await holdOne(page, [1, 2]);
    assert.equal((await api.confirm(r.base, b.token, b.id)).status, 200);
    await page.click("#cancel");
    await waitText(page, "#message", /already paid, so it cannot be cancelled/);
    figure(`cancel after payment: "${(await page.textContent("#message")).trim()}"`);

    b = await holdOne(page, [1, 3]);
    // The page's countdown stands still while the server's hold runs out.
    await page.clock.pauseAt(Date.now() + 500);
    await waitFor("the hold to expire on the server", async () => (await fetch(`${r.base}/api/bookings/${b.id}`, { headers: { Authorization: `Bearer ${b.token}` } }).then((x) => x.json())).status === "EXPIRED", { timeout: 10000 });
    await page.click("#confirm");
    await waitText(page, "#message", /Too late: your hold expired/);
    figure(`confirm after expiry: "${(await page.textContent("#message")).trim()}"`);
    assert.ok(await page.isVisible("#choose"), "back to choosing seats");
    await page.clock.resume();
    proxy.resumeStreams();
    await waitSeats(page, [[1, 3]], "available");
  }),
);
