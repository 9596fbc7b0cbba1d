// Best available: the page asks the server for N seats together instead of
// naming them. The expected seats below follow the contract's ranking
// (row nearest the stage; no stranded single seat; distance of the block's
// centre from the row's centre (cols + 1) / 2; lower first column).

import assert from "node:assert/strict";
import { createRequire } from "node:module";
import test from "node:test";
import { api, figure, newPage, openSchedule, pageMap, seatSelector, waitSeats, waitText, withSetup } from "../lib/harness.js";

const require = createRequire(import.meta.url);
const AXE = require.resolve("axe-core/axe.min.js");

const focused = (page) =>
  page.evaluate(() => {
    const el = document.activeElement;
    const outline = el ? getComputedStyle(el).outlineStyle : "none";
    return { id: el?.id || "", label: el?.getAttribute("aria-label") || "", text: el?.textContent.trim() || "", outline };
  });

/** The start requests the page sends: their bodies and Idempotency-Keys. */
function recordStarts(page) {
  const starts = [];
  page.on("request", (req) => {
    if (req.method() === "POST" && new URL(req.url()).pathname === "/api/bookings/start") {
      starts.push({ body: req.postDataJSON(), key: req.headers()["idempotency-key"] });
    }
  });
  return starts;
}

const bookings = async (db) => (await db.query("SELECT count(*)::int AS n FROM bookings")).rows[0].n;

test("10a. best available of 2 holds the front-centre pair, replacing a manual pick; another replica's viewer sees it; confirm sells it", { timeout: 60000 }, () =>
  withSetup(async (s) => {
    const ra = await s.replica();
    const rb = await s.replica();
    const { id } = await api.createSchedule(ra.base, { rows: 6, cols: 10 });
    const browser = await s.browser();
    const a = await newPage(await browser.newContext(), s.problems);
    const b = await newPage(await browser.newContext(), s.problems);
    const starts = recordStarts(a);
    await openSchedule(a, ra.base, id);
    await openSchedule(b, rb.base, id);

    // Row 1; row centre (10 + 1) / 2 = 5.5; seats 5-6 are centred on it
    // exactly and leave 1-4 and 7-10 as runs of four, so nothing is stranded.
    const expected = [
      [1, 5],
      [1, 6],
    ];
    // A picks a seat by hand first: best available replaces it.
    await a.click(seatSelector(3, 2));
    assert.equal(await a.inputValue("#quantity"), "2", "a party of two is the default");
    assert.equal((await a.textContent("#best")).trim(), "Best available: 2 seats");
    assert.match(await a.textContent("#best-hint"), /replaces any seats you picked on the map/);

    const t0 = Date.now();
    await a.click("#best");
    await waitSeats(a, expected, "yours");
    const aHeld = Date.now() - t0;
    await waitSeats(b, expected, "held", 5000);
    const bHeld = Date.now() - t0;
    const said = (await a.textContent("#message")).trim();
    assert.equal(said, "Row 1, seats 5 and 6 are held for you, instead of the seats you had picked. Complete the payment before the time runs out.");
    assert.equal((await a.textContent("#held-seats")).trim(), "Row 1, seats 5 and 6");
    assert.ok(await a.isVisible("#payment"), "the payment step is shown");
    assert.ok(!(await a.isVisible("#choose")), "the choosing controls are gone");
    await waitSeats(a, [[3, 2]], "available");
    await waitSeats(b, [[3, 2]], "available");
    figure(`best available 2: yours on A ${aHeld} ms after the click, held on B (other replica) ${bHeld} ms after it`);
    figure(`A was told: "${said}"`);
    assert.ok(bHeld - aHeld < 1000, `B saw the hold ${bHeld - aHeld} ms after A had it`);

    // The page sent a quantity, not seats, with a key of its own.
    assert.equal(starts.length, 1);
    assert.deepEqual(starts[0].body, { scheduleId: id, quantity: 2 });
    assert.match(starts[0].key || "", /^[0-9a-f]{32}$/);
    const row = (await s.db.query("SELECT count(*)::int AS n, min(idempotency_key) AS key FROM bookings")).rows[0];
    assert.equal(row.n, 1);
    assert.equal(row.key, starts[0].key);

    const t1 = Date.now();
    await a.click("#confirm");
    await waitSeats(b, expected, "sold", 5000);
    const bSold = Date.now() - t1;
    await waitSeats(a, expected, "sold");
    await waitText(a, "#message", /Payment complete\. Row 1, seats 5 and 6 are booked for you\./);
    figure(`confirmed: sold on B ${bSold} ms after Complete payment`);
    assert.deepEqual(await pageMap(b), await api.snapshotMap(rb.base, id));
  }),
);

test("10b. no two seats together: the sentence names the largest block, offers it, and nothing is held", { timeout: 60000 }, () =>
  withSetup(async (s) => {
    const r = await s.replica();
    const { id } = await api.createSchedule(r.base, { rows: 2, cols: 7 });
    // Row 1: x.x.x.x taken at 2, 4, 6 (free singles 1, 3, 5, 7); row 2: taken at 3 and 6
    // (free runs 1-2, 4-5 and 7): the largest block is 2.
    const other = await api.guest(r.base);
    const sold = await api.start(r.base, other, id, [
      [1, 2],
      [1, 4],
      [1, 6],
    ]);
    assert.equal(sold.status, 201);
    assert.equal((await api.confirm(r.base, other, sold.body.bookingId)).status, 200);
    assert.equal((await api.start(r.base, await api.guest(r.base), id, [
      [2, 3],
      [2, 6],
    ])).status, 201);

    const browser = await s.browser();
    const page = await newPage(await browser.newContext(), s.problems);
    const starts = recordStarts(page);
    await openSchedule(page, r.base, id);

    // A party of four: the most together is 2, offered.
    await page.selectOption("#quantity", "4");
    assert.equal((await page.textContent("#best")).trim(), "Best available: 4 seats");
    let t0 = Date.now();
    await page.click("#best");
    await waitText(page, "#message", /No 4 seats together are left/);
    const told4 = Date.now() - t0;
    let text = (await page.textContent("#message")).trim();
    assert.equal(text, "No 4 seats together are left; the most together is 2. Try 2, or pick seats yourself.");
    assert.equal(await page.inputValue("#quantity"), "2", "the smaller party is offered");
    assert.equal((await page.textContent("#best")).trim(), "Best available: 2 seats");
    figure(`party of 4 told in ${told4} ms: "${text}"`);

    // Someone takes the pairs of row 2 apart (the page sees it live): only
    // 1-seat gaps are left, and the party of two offered above does not fit.
    assert.equal((await api.start(r.base, await api.guest(r.base), id, [
      [2, 1],
      [2, 5],
    ])).status, 201);
    await waitSeats(page, [
      [2, 1],
      [2, 5],
    ], "held");
    t0 = Date.now();
    await page.click("#best");
    await waitText(page, "#message", /No 2 seats together are left/);
    const told2 = Date.now() - t0;
    text = (await page.textContent("#message")).trim();
    assert.equal(text, "No 2 seats together are left; only single seats are free. Try 1, or pick seats yourself.");
    assert.equal(await page.inputValue("#quantity"), "1");
    figure(`party of 2 with only single seats left, told in ${told2} ms: "${text}"`);

    // Nothing was held by either refusal: no booking, no change on the map.
    assert.equal(await bookings(s.db), 3);
    assert.ok(await page.isVisible("#choose"), "still choosing");
    assert.deepEqual(await pageMap(page), await api.snapshotMap(r.base, id));
    assert.deepEqual(
      starts.map((x) => x.body.quantity),
      [4, 2],
    );
    assert.notEqual(starts[0].key, starts[1].key, "one Idempotency-Key per attempt");

    // Taking the offer: row 1 has singles at 1, 3, 5, 7, none of which
    // strands a seat; 3 and 5 are nearest the centre (4); 3 is the lower.
    await page.click("#best");
    await waitSeats(page, [[1, 3]], "yours");
    await waitText(page, "#message", /^Row 1, seat 3 is held for you\./);
    figure("the offered party of 1 then held Row 1, seat 3");
  }),
);

test("10c. keyboard only: Tab to the quantity, change it, Tab to Best available, hold and pay", { timeout: 60000 }, () =>
  withSetup(async (s) => {
    const r = await s.replica();
    const { id } = await api.createSchedule(r.base, { rows: 4, cols: 8, blocked: [{ row: 1, col: 1 }] });
    const browser = await s.browser();
    const page = await newPage(await browser.newContext(), s.problems);
    await openSchedule(page, r.base, id);

    // From the top of the page: the brand link, the grid's one tab stop,
    // then (Pay is disabled while nothing is selected) the quantity.
    const path = [];
    let f;
    do {
      await page.keyboard.press("Tab");
      f = await focused(page);
      path.push(f.id || f.label || f.text);
    } while (f.id !== "quantity" && path.length < 10);
    assert.equal(f.id, "quantity", `Tab reached: ${path.join(" > ")}`);
    assert.deepEqual(path.slice(-2), ["Row 1, seat 2, available", "quantity"]);
    assert.notEqual(f.outline, "none", "focus on the quantity is visible");

    // Arrow keys change a closed <select> without opening it.
    await page.keyboard.press("ArrowDown");
    assert.equal(await page.inputValue("#quantity"), "3");
    assert.equal((await page.textContent("#best")).trim(), "Best available: 3 seats");
    await page.keyboard.press("Tab");
    f = await focused(page);
    assert.equal(f.id, "best");
    assert.notEqual(f.outline, "none", "focus on Best available is visible");
    path.push(f.id);

    // Row 1 is seats 2-8 (seat 1 blocked), centre 4.5. Seats 3-5 and 4-6 are
    // equally near it, but 3-5 would strand seat 2 (between the blocked seat
    // and the block); 4-6 strands nothing.
    const expected = [
      [1, 4],
      [1, 5],
      [1, 6],
    ];
    const t0 = Date.now();
    await page.keyboard.press("Enter");
    await waitSeats(page, expected, "yours");
    const held = Date.now() - t0;
    await waitText(page, "#message", /^Row 1, seats 4, 5 and 6 are held for you\./);
    assert.equal((await focused(page)).id, "confirm", "focus moves to the payment step");
    await page.keyboard.press("Enter");
    await waitText(page, "#message", /Payment complete/);
    await waitSeats(page, expected, "sold");
    assert.ok((await focused(page)).label.startsWith("Row"), "focus returns to the grid when the payment step closes");
    figure(`keyboard: ${path.join(" > ")}; held ${held} ms after Enter, paid ${Date.now() - t0} ms after it`);
  }),
);

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

test("10d. axe: no serious or critical violations with the best-available control; usable at 390 px", { timeout: 90000 }, () =>
  withSetup(async (s) => {
    const r = await s.replica();
    const browser = await s.browser();
    const serious = [];

    // Rows of 3: a party of 4 never fits, so the refusal is on the page too.
    const small = await api.createSchedule(r.base, { title: "Studio", rows: 3, cols: 3 });
    // bypassCSP only so axe can be injected; tests 10a-c run under the CSP.
    const desktop = await browser.newContext({ viewport: { width: 1280, height: 860 }, bypassCSP: true });
    const page = await newPage(desktop, s.problems);
    await openSchedule(page, r.base, small.id);
    await page.click(seatSelector(2, 2));
    serious.push(...(await audit(page, "the seat map with a selection and the best-available control")));
    await page.selectOption("#quantity", "4");
    await page.click("#best");
    await waitText(page, "#message", /No 4 seats together are left; the most together is 3\. Try 3, or pick seats yourself\./);
    serious.push(...(await audit(page, "the map after no_seats_together")));

    // Phone: the control fits the width, its targets are finger-sized, and
    // the payment step after best available passes too.
    const { id } = await api.createSchedule(r.base, { title: "Matinée", rows: 8, cols: 12 });
    const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true, bypassCSP: true });
    const mobile = await newPage(phone, s.problems);
    await openSchedule(mobile, r.base, id);
    const boxes = {};
    for (const sel of ["#quantity", "#best", "#bar"]) boxes[sel] = await mobile.$eval(sel, (e) => e.getBoundingClientRect().toJSON());
    for (const sel of ["#quantity", "#best"]) {
      const b = boxes[sel];
      assert.ok(b.left >= 0 && b.right <= 390, `${sel} inside the 390 px width: ${JSON.stringify(b)}`);
      assert.ok(b.height >= 44, `${sel} is at least 44 px high: ${b.height}`);
      assert.ok(b.top >= boxes["#bar"].top && b.bottom <= 844, `${sel} on screen in the pay bar`);
    }
    figure(`phone 390x844: pay bar ${Math.round(boxes["#bar"].height)} px high; quantity ${Math.round(boxes["#quantity"].width)}x${Math.round(boxes["#quantity"].height)}, button ${Math.round(boxes["#best"].width)}x${Math.round(boxes["#best"].height)}`);
    serious.push(...(await audit(mobile, "the seat map with the best-available control (phone)")));
    await mobile.tap("#best");
    // Row 1 of 12, centre 6.5: seats 6 and 7.
    await waitSeats(mobile, [
      [1, 6],
      [1, 7],
    ], "yours");
    serious.push(...(await audit(mobile, "the payment step after best available (phone)")));

    assert.deepEqual(serious, [], "no serious or critical violations");
  }),
);
