// The whole flow without a mouse: one tab stop for the grid, arrows move,
// Space/Enter select, then Pay and Complete payment from the keyboard.

import assert from "node:assert/strict";
import test from "node:test";
import { api, figure, newPage, openSchedule, waitSeats, waitText, withSetup } from "../lib/harness.js";

const focused = (page) =>
  page.evaluate(() => {
    const el = document.activeElement;
    const outline = el ? getComputedStyle(el).outlineStyle : "none";
    return { id: el?.id || "", label: el?.getAttribute("aria-label") || "", tab: el?.tabIndex, outline };
  });

test("3. choose, pay and confirm by keyboard only", { timeout: 60000 }, () =>
  withSetup(async (s) => {
    const r = await s.replica();
    const { id } = await api.createSchedule(r.base, { rows: 4, cols: 8, blocked: [{ row: 1, col: 1 }] });
    const browser = await s.browser();
    const page = await newPage(await browser.newContext(), s.problems);
    await openSchedule(page, r.base, id);

    // Tab from the top of the page until focus lands in the grid.
    let tabs = 0;
    let f;
    do {
      await page.keyboard.press("Tab");
      tabs++;
      f = await focused(page);
    } while (!f.label.startsWith("Row") && tabs < 10);
    assert.equal(f.label, "Row 1, seat 2, available", "the grid's tab stop is its first free seat");
    assert.notEqual(f.outline, "none", "focus is visible");
    const seatsInTabOrder = await page.$$eval("#grid button", (bs) => bs.filter((b) => b.tabIndex === 0).length);
    assert.equal(seatsInTabOrder, 1, "one tab stop for the whole grid");

    for (const key of ["ArrowRight", "ArrowDown"]) await page.keyboard.press(key);
    assert.equal((await focused(page)).label, "Row 2, seat 3, available");
    await page.keyboard.press("Space");
    assert.equal((await focused(page)).label, "Row 2, seat 3, selected");
    assert.equal(await page.evaluate(() => document.activeElement.getAttribute("aria-pressed")), "true");
    await page.keyboard.press("ArrowRight");
    await page.keyboard.press("Enter");
    assert.equal((await focused(page)).label, "Row 2, seat 4, selected");
    await page.keyboard.press("ArrowLeft");
    await page.keyboard.press("ArrowUp");
    await page.keyboard.press("ArrowLeft");
    assert.equal((await focused(page)).label, "Row 1, seat 2, available");
    await page.keyboard.press("ArrowLeft");
    assert.equal((await focused(page)).label, "Row 1, seat 1, blocked", "arrows reach blocked seats too");
    await page.keyboard.press("Space");
    await waitText(page, "#message", /Row 1, seat 1 is blocked/);
    assert.equal((await page.textContent("#summary")).trim(), "2 of 4 selected");

    // One Tab leaves the grid for Pay; Shift+Tab comes back to the same seat.
    await page.keyboard.press("Tab");
    assert.equal((await focused(page)).id, "pay");
    await page.keyboard.press("Shift+Tab");
    assert.equal((await focused(page)).label, "Row 1, seat 1, blocked");
    await page.keyboard.press("Tab");

    const t0 = Date.now();
    await page.keyboard.press("Enter");
    await waitSeats(page, [
      [2, 3],
      [2, 4],
    ], "yours");
    assert.equal((await focused(page)).id, "confirm", "focus moves to the payment step");
    await page.keyboard.press("Enter");
    await waitText(page, "#message", /Payment complete/);
    await waitSeats(page, [
      [2, 3],
      [2, 4],
    ], "sold");
    const f2 = await focused(page);
    assert.ok(f2.label.startsWith("Row"), "focus returns to the grid when the payment step closes");
    figure(`keyboard flow: ${tabs} Tab presses into the grid, booked and paid ${Date.now() - t0} ms after Enter on Pay`);
  }),
);
