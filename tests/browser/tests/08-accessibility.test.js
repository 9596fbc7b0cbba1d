// axe-core audit of the list and the seat map (in every seat state), plus
// the screenshots in docs/ at desktop and phone widths.

import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import test from "node:test";
import { REPO, api, figure, newPage, openSchedule, seatSelector, waitSeats, withSetup } from "../lib/harness.js";

const require = createRequire(import.meta.url);
const AXE = require.resolve("axe-core/axe.min.js");
const DOCS = path.join(REPO, "docs");

async function audit(page, what) {
  await page.addScriptTag({ path: AXE });
  const result = await page.evaluate(async () => {
    const r = await window.axe.run(document, { resultTypes: ["violations"] });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, nodes: v.nodes.length, help: v.help }));
  });
  const serious = result.filter((v) => v.impact === "serious" || v.impact === "critical");
  figure(
    `axe on ${what}: ${result.length} violations (${serious.length} serious or critical)` +
      (result.length ? `: ${result.map((v) => `${v.id} [${v.impact}] x${v.nodes}`).join(", ")}` : ""),
  );
  return serious;
}

/** A showing with every state on it: blocked aisle, sold, held by others. */
async function scene(base) {
  const blocked = [];
  for (let row = 1; row <= 10; row++) blocked.push({ row, col: 5 }, { row, col: 14 });
  blocked.push({ row: 1, col: 1 }, { row: 1, col: 18 });
  const schedule = await api.createSchedule(base, { title: "Hamlet — opening night", rows: 10, cols: 18, blocked, startsAt: "2026-12-24T19:30:00Z" });
  const taken = [
    [[2, 7], [2, 8], [2, 9]],
    [[3, 10], [3, 11]],
    [[5, 1], [5, 2], [5, 3], [5, 4]],
    [[6, 15], [6, 16]],
    [[8, 8], [8, 9], [8, 10], [8, 11]],
  ];
  for (const [k, seats] of taken.entries()) {
    const t = await api.guest(base);
    const b = await api.start(base, t, schedule.id, seats);
    assert.equal(b.status, 201);
    if (k % 2 === 0) assert.equal((await api.confirm(base, t, b.body.bookingId)).status, 200);
  }
  await api.createSchedule(base, { title: "Hamlet — matinée", rows: 8, cols: 12, startsAt: "2026-12-26T14:00:00Z" });
  return schedule.id;
}

test("8. no serious or critical axe violations; screenshots at 1280 and 390 wide", { timeout: 120000 }, () =>
  withSetup(async (s) => {
    const r = await s.replica();
    const id = await scene(r.base);
    const browser = await s.browser();
    mkdirSync(DOCS, { recursive: true });
    const serious = [];

    // Desktop: the list, then the map with a selection.
    // bypassCSP only so axe can be injected; the page itself runs under the CSP elsewhere.
    const desktop = await browser.newContext({ viewport: { width: 1280, height: 860 }, bypassCSP: true, locale: "en-GB", timezoneId: "UTC" });
    const page = await newPage(desktop, s.problems);
    await page.goto(`${r.base}/`);
    await page.waitForFunction(() => [...document.querySelectorAll(".showings .left")].every((e) => /left|Sold/.test(e.textContent)));
    serious.push(...(await audit(page, "the list of showings")));
    await page.screenshot({ path: path.join(DOCS, "showings-desktop.png") });

    await openSchedule(page, r.base, id);
    for (const [row, col] of [
      [4, 8],
      [4, 9],
    ])
      await page.click(seatSelector(row, col));
    await page.focus(seatSelector(4, 9));
    // No hover effect in the picture, so reruns draw the same pixels.
    await page.mouse.move(0, 0);
    serious.push(...(await audit(page, "the seat map with a selection")));
    await page.screenshot({ path: path.join(DOCS, "seat-map-desktop.png") });

    // Phone: the payment step with the viewer's own seats.
    const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true, bypassCSP: true, locale: "en-GB", timezoneId: "UTC" });
    const mobile = await newPage(phone, s.problems);
    await openSchedule(mobile, r.base, id);
    for (const [row, col] of [
      [7, 6],
      [7, 7],
    ])
      await mobile.tap(seatSelector(row, col));
    await mobile.tap("#pay");
    await waitSeats(mobile, [
      [7, 6],
      [7, 7],
    ], "yours");
    serious.push(...(await audit(mobile, "the seat map in the payment step (phone)")));
    // The pay bar stays on screen while the map scrolls.
    const bar = await mobile.$eval("#bar", (e) => e.getBoundingClientRect().toJSON());
    assert.ok(bar.bottom <= 844 + 1 && bar.top < 844, `pay bar on screen: ${JSON.stringify(bar)}`);
    await mobile.screenshot({ path: path.join(DOCS, "seat-map-phone.png") });
    figure("screenshots: docs/showings-desktop.png, docs/seat-map-desktop.png, docs/seat-map-phone.png");

    assert.deepEqual(serious, [], "no serious or critical violations");
  }),
);
