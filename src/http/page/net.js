// The network layer: JSON requests with retry and backoff, the guest token,
// and the live seat feed (snapshot + stream with resume). Knows nothing of
// the DOM; it reports to the store and through callbacks.

/** An answer the server gave that was not a success (problem+json). */
export class ApiProblem extends Error {
  constructor(status, body) {
    super((body && body.detail) || `HTTP ${status}`);
    this.status = status;
    this.code = (body && body.code) || "";
    this.body = body || {};
  }
}

/** The server could not be reached (after the retries). */
export class NetworkFailure extends Error {}

const RETRYABLE = new Set([429, 502, 503, 504]);
const MAX_ATTEMPTS = 7;

function backoff(attempt, retryAfter) {
  const seconds = Number(retryAfter);
  if (Number.isFinite(seconds) && seconds > 0) return Math.min(seconds * 1000, 30000);
  // 0.5 s, 1 s, 2 s ... up to 8 s, with jitter so a crowd of pages that lost
  // the same replica does not come back in one burst.
  const base = Math.min(500 * 2 ** attempt, 8000);
  return base / 2 + Math.random() * (base / 2);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Sends one request; on a network error, 429, 502, 503 or 504 sends the very
 * same request again (same headers, so the same Idempotency-Key) after a
 * backoff, calling `onRetry(delayMs)` so the page can say it is retrying.
 * Resolves to { status, body, date } for 2xx; rejects with ApiProblem or
 * NetworkFailure.
 */
export async function request(path, { method = "GET", token, body, headers = {}, onRetry } = {}) {
  const h = { Accept: "application/json", ...headers };
  if (token) h.Authorization = `Bearer ${token}`;
  if (body !== undefined) h["Content-Type"] = "application/json";
  const init = { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" };
  for (let attempt = 0; ; attempt++) {
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      if (attempt + 1 >= MAX_ATTEMPTS) throw new NetworkFailure(String(e));
      const delay = backoff(attempt);
      if (onRetry) onRetry(delay, null);
      await sleep(delay);
      continue;
    }
    const received = Date.now();
    let json = null;
    try {
      const text = await response.text();
      if ((response.headers.get("content-type") || "").includes("json")) json = JSON.parse(text);
    } catch (e) {
      // A body cut off in transit is a network failure like any other: the
      // request is sent again (same Idempotency-Key), not misread.
      if (!(e instanceof SyntaxError)) {
        if (attempt + 1 >= MAX_ATTEMPTS) throw new NetworkFailure(String(e));
        const delay = backoff(attempt);
        if (onRetry) onRetry(delay, null);
        await sleep(delay);
        continue;
      }
    }
    if (response.ok) {
      return { status: response.status, body: json, date: response.headers.get("date"), received };
    }
    if (RETRYABLE.has(response.status) && attempt + 1 < MAX_ATTEMPTS) {
      const delay = backoff(attempt, response.headers.get("retry-after"));
      if (onRetry) onRetry(delay, response.status);
      await sleep(delay);
      continue;
    }
    throw new ApiProblem(response.status, json);
  }
}

const TOKEN_KEY = "seatsync.guest";

/** A guest token, kept in localStorage so a reload keeps the same user (and its hold). */
export async function guestToken({ onRetry, renew = false } = {}) {
  if (!renew) {
    try {
      const saved = JSON.parse(localStorage.getItem(TOKEN_KEY) || "null");
      // A minute of margin: a token that lapses mid-checkout would orphan the hold.
      if (saved && typeof saved.token === "string" && Date.parse(saved.expiresAt) - Date.now() > 60000) {
        return saved.token;
      }
    } catch {
      // A damaged entry is replaced below.
    }
  }
  const { body } = await request("/api/auth/guest", { method: "POST", onRetry });
  localStorage.setItem(TOKEN_KEY, JSON.stringify({ token: body.token, expiresAt: body.expiresAt }));
  return body.token;
}

/**
 * Keeps a SeatStore equal to the server: the snapshot first, then the stream
 * resumed at the snapshot's lastEventId (so nothing between the two is lost),
 * every event applied once and in order. A `resync` or a gap in the ids
 * reloads the snapshot; a dropped stream is resumed by EventSource itself
 * (Last-Event-ID), one it gave up on is reopened here with backoff.
 */
export class SeatFeed {
  constructor(scheduleId, store, { onConnection = () => {}, onEvent = () => {}, onRetry } = {}) {
    this.scheduleId = scheduleId;
    this.store = store;
    this.onConnection = onConnection;
    this.onEvent = onEvent;
    this.onRetry = onRetry;
    this.lastId = null;
    this.loading = null;
    this.buffer = [];
    this.source = null;
    this.reopenAttempt = 0;
    this.state = "";
  }

  async start() {
    this.setState("connecting");
    await this.loadSnapshot();
    this.open();
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.onConnection(state);
  }

  /** Loads the snapshot; events that arrive meanwhile wait in `buffer`. */
  loadSnapshot() {
    if (this.loading) return this.loading;
    this.loading = (async () => {
      try {
        const { body } = await request(`/api/schedules/${this.scheduleId}/seat-status`, { onRetry: this.onRetry });
        this.store.loadSnapshot(body.seats);
        this.lastId = Number(body.lastEventId);
      } finally {
        this.loading = null;
      }
      const waiting = this.buffer;
      this.buffer = [];
      for (const e of waiting) this.apply(e);
    })();
    return this.loading;
  }

  open() {
    const url = `/api/schedules/${this.scheduleId}/seats/stream?lastEventId=${encodeURIComponent(String(this.lastId ?? 0))}`;
    const source = new EventSource(url);
    this.source = source;
    source.onopen = () => {
      this.reopenAttempt = 0;
      this.setState("live");
    };
    source.onmessage = (ev) => this.receive(ev);
    source.addEventListener("resync", () => this.resync());
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // EventSource gives up on an HTTP error (e.g. 503 from a full
        // replica); reopen it ourselves from the last applied event.
        source.close();
        if (this.source === source) this.source = null;
        this.setState("reconnecting");
        const delay = backoff(this.reopenAttempt++);
        setTimeout(() => {
          if (this.source === null) this.open();
        }, delay);
      } else {
        this.setState("reconnecting");
      }
    };
  }

  receive(ev) {
    const id = Number(ev.lastEventId);
    let data;
    try {
      data = JSON.parse(ev.data);
    } catch {
      return;
    }
    const event = { id, action: data.action, seats: Array.isArray(data.seats) ? data.seats : [] };
    if (this.loading) {
      this.buffer.push(event);
      return;
    }
    this.apply(event);
  }

  apply(event) {
    if (!Number.isFinite(event.id) || event.id <= this.lastId) return; // already in the map
    if (event.id !== this.lastId + 1) {
      // Ids are dense per schedule: a hole means something was missed.
      // Keep the event: the snapshot may turn out older than it.
      this.resync();
      this.buffer.push(event);
      return;
    }
    const t0 = performance.now();
    this.store.applyEvent(event.action, event.seats);
    this.lastId = event.id;
    // Only the latest measure is kept, so a long session does not pile them up.
    performance.clearMeasures("seatsync:event");
    performance.measure("seatsync:event", { start: t0, end: performance.now() });
    this.onEvent(event);
  }

  resync() {
    this.loadSnapshot().catch(() => this.setState("reconnecting"));
  }

  stop() {
    if (this.source) this.source.close();
    this.source = null;
  }
}
