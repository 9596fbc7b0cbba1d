// The page talks to its own server and nothing else (no CDN, no font
// service), under a self-only Content-Security-Policy, with cacheable assets.

import assert from "node:assert/strict";
import test from "node:test";
import { api, figure, newPage, seatSelector, waitSeats, waitText, withSetup } from "../lib/harness.js";

test("7. every request goes to the server itself; CSP and caching headers", { timeout: 60000 }, () =>
  withSetup(async (s) => {
    const r = await s.replica();
    const { id } = await api.createSchedule(r.base, { title: "Requests <script>alert(1)</script>", rows: 4, cols: 6 });
    const browser = await s.browser();
    const context = await browser.newContext();
    const requests = [];
    context.on("request", (req) => requests.push(req.url()));
    const page = await newPage(context, s.problems);

    await page.goto(`${r.base}/`);
    await page.waitForSelector(".showings a");
    await waitText(page, ".showings .left", /seats left/);
    // The title is text, never markup.
    assert.equal((await page.textContent(".showings a")).trim(), "Requests <script>alert(1)</script>");
    assert.equal(await page.$$eval("script", (ss) => ss.filter((x) => !x.src).length), 0, "no inline script");
    await page.click(".showings a");
    await page.waitForSelector('#connection[data-state="live"]');
    await page.click(seatSelector(2, 2));
    await page.click("#pay");
    await waitSeats(page, [[2, 2]], "yours");
    await page.click("#confirm");
    await waitText(page, "#message", /Payment complete/);

    const origin = new URL(r.base).origin;
    const foreign = requests.filter((u) => !u.startsWith(`${origin}/`));
    const paths = [...new Set(requests.map((u) => new URL(u).pathname.replace(/[0-9a-f-]{36}/, "{id}")))];
    figure(`${requests.length} requests, ${foreign.length} to other hosts; paths: ${paths.join(" ")}`);
    assert.deepEqual(foreign, []);

    // Headers of the page and its assets.
    for (const p of ["/", `/schedules/${id}`, "/assets/schedule.js", "/assets/app.css"]) {
      const res = await fetch(r.url(p));
      assert.equal(res.status, 200, p);
      const csp = res.headers.get("content-security-policy") || "";
      assert.match(csp, /default-src 'self'/, p);
      assert.match(csp, /script-src 'self'(;|$)/, p);
      assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval|https?:/, p);
      const etag = res.headers.get("etag");
      assert.ok(etag, `${p} has an ETag`);
      assert.ok(res.headers.get("cache-control"), `${p} has Cache-Control`);
      const again = await fetch(r.url(p), { headers: { "If-None-Match": etag } });
      assert.equal(again.status, 304, `${p} revalidates`);
    }
    const missing = await fetch(r.url("/assets/nope.js"));
    assert.equal(missing.status, 404);
    assert.equal(missing.headers.get("content-type"), "application/problem+json");
    assert.equal((await missing.json()).code, "not_found");
    figure("CSP self-only on page and assets; ETag revalidation answers 304; an unknown asset is 404 problem+json");
  }),
);
