// Checkout: Pay (hold the selection) or Best available (let the server pick
// N seats together), the payment step with its countdown, confirm and
// cancel. Every outcome, good or bad, ends in a sentence.

import { ApiProblem, NetworkFailure, guestToken, request } from "./net.js";
import { bestLabel, justTaken, mmss, noSeatsTogether, seatList } from "./text.js";

const UNREACHABLE = "We cannot reach the server right now. Check your connection and try again.";
// While a best-available start is on its way any seat may turn out to be ours.
const ANY_SEAT = "any";
const EXPIRED = "Your hold expired before payment, so the seats were released and are available again. You can choose seats again.";

/** 128 random bits as hex; works where crypto.randomUUID does not (plain http). */
function attemptKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * How far the server's clock is ahead of ours, from a response's Date header.
 * Date has one-second resolution, so smaller differences are noise.
 */
function clockSkew(date, received) {
  const server = Date.parse(date || "");
  if (!Number.isFinite(server)) return 0;
  const skew = server + 500 - received;
  return Math.abs(skew) <= 1000 ? 0 : skew;
}

export class Checkout {
  constructor({ scheduleId, holdSeconds, store, ui, say, focusGrid = () => {} }) {
    this.focusGrid = focusGrid;
    this.holdSeconds = holdSeconds;
    this.scheduleId = scheduleId;
    this.store = store;
    this.ui = ui; // { pay, best, quantity, confirm, cancel, choose, payment, heldSeats, countdown }
    this.say = say;
    this.booking = null; // { bookingId, seats, deadline }
    this.busy = false;
    this.inflight = null;
    this.timer = null;
    this.storageKey = `seatsync.booking.${scheduleId}`;
    ui.pay.addEventListener("click", () => this.pay());
    ui.best.addEventListener("click", () => this.bestAvailable());
    // A party of two is the common case; never more than a booking allows.
    for (let n = 1; n <= store.maxSelected; n++) {
      const option = document.createElement("option");
      option.value = String(n);
      option.textContent = String(n);
      ui.quantity.append(option);
    }
    ui.quantity.addEventListener("change", () => this.setQuantity(Number(ui.quantity.value)));
    this.setQuantity(Math.min(2, store.maxSelected));
    ui.confirm.addEventListener("click", () => this.confirm());
    ui.cancel.addEventListener("click", () => this.cancel());
  }

  retrying = (delay, status) => {
    const why = status === 503 || status === 502 || status === 504 ? "The server is busy" : status === 429 ? "Too many requests" : "Connection problem";
    this.say(`${why}; retrying in ${Math.max(1, Math.round(delay / 1000))} s…`);
  };

  /** Brings back the pending booking this tab had before a reload. */
  async restore() {
    const id = sessionStorage.getItem(this.storageKey);
    if (!id) return;
    try {
      const token = await guestToken({ onRetry: this.retrying });
      const r = await request(`/api/bookings/${encodeURIComponent(id)}`, { token, onRetry: this.retrying });
      if (r.body.status === "PENDING") {
        this.showPending(r.body, r);
        this.say(`Your hold is back: ${seatList(r.body.seats)}. Complete the payment before the time runs out.`);
      } else {
        this.forget();
      }
    } catch (e) {
      // A booking we cannot see any more (new guest, expired) is simply gone.
      if (e instanceof ApiProblem && (e.status === 404 || e.status === 400 || e.status === 401)) this.forget();
      else if (e instanceof NetworkFailure) this.say(UNREACHABLE);
    }
  }

  setQuantity(n) {
    this.ui.quantity.value = String(n);
    this.ui.best.textContent = bestLabel(n);
  }

  async pay() {
    if (this.busy || this.booking) return; // a double click is one attempt
    const seats = this.store.selectedSeats();
    if (seats.length === 0) {
      this.say("Choose at least one seat first.");
      return;
    }
    await this.hold(
      { seats },
      {
        holding: `Holding ${seatList(seats)}…`,
        inflight: new Set(seats.map((s) => `${s.row}:${s.col}`)),
        button: "Pay",
      },
    );
  }

  /**
   * Lets the server choose `quantity` adjacent seats. Seats picked on the
   * map are not sent: a successful hold replaces them (the hint under the
   * button says so), a refused one leaves them as they were.
   */
  async bestAvailable() {
    if (this.busy || this.booking) return; // a double click is one attempt
    const quantity = Number(this.ui.quantity.value);
    await this.hold(
      { quantity },
      {
        holding: `Looking for the best ${quantity === 1 ? "seat" : `${quantity} seats together`}…`,
        inflight: ANY_SEAT,
        button: "Best available",
        replacing: this.store.selected.size > 0,
      },
    );
  }

  /** One start request (`choice` is `{seats}` or `{quantity}`), then the payment step. */
  async hold(choice, { holding, inflight, button, replacing = false }) {
    this.busy = true;
    this.inflight = inflight;
    // aria-disabled, not disabled: a disabled button loses keyboard focus,
    // and after a 409 the user wants to press the button again from where they are.
    this.refreshPay();
    // One key per attempt: the retries inside request() reuse it, so a lost
    // response never makes a second booking.
    const key = attemptKey();
    this.say(holding);
    try {
      const r = await this.withToken((token) =>
        request("/api/bookings/start", {
          method: "POST",
          token,
          headers: { "Idempotency-Key": key },
          body: { scheduleId: this.scheduleId, ...choice },
          onRetry: this.retrying,
        }),
      );
      this.store.clearSelection();
      this.showPending(r.body, r);
      const seats = r.body.seats;
      this.say(
        `${seatList(seats)} ${seats.length === 1 ? "is" : "are"} held for you${replacing ? ", instead of the seats you had picked" : ""}. Complete the payment before the time runs out.`,
      );
    } catch (e) {
      await this.startFailed(e, choice, button);
    } finally {
      this.busy = false;
      this.inflight = null;
      this.refreshPay();
    }
  }

  /** Whether `seat` is part of a start request still awaiting its answer. */
  requesting(seat) {
    if (this.inflight === ANY_SEAT) return true;
    return this.inflight !== null && this.inflight.has(`${seat.row}:${seat.col}`);
  }

  async startFailed(e, choice, button) {
    if (e instanceof ApiProblem && e.code === "no_seats_together") {
      const largest = Number(e.body.largestBlock);
      // Offer the party that still fits: one press of the button tries it.
      if (Number.isInteger(largest) && largest > 0 && largest <= this.store.maxSelected) this.setQuantity(largest);
      this.say(noSeatsTogether(choice.quantity, largest));
    } else if (e instanceof ApiProblem && e.code === "seats_taken") {
      const taken = Array.isArray(e.body.seats) ? e.body.seats : [];
      this.store.markTaken(taken);
      const left = this.store.selectedSeats().length;
      this.say(`${justTaken(taken)} ${left ? "The rest of your selection is kept; press Pay again to hold it." : "Please choose other seats."}`);
    } else if (e instanceof ApiProblem && e.code === "booking_in_progress") {
      try {
        const token = await guestToken();
        const r = await request(`/api/bookings/${encodeURIComponent(e.body.bookingId)}`, { token, onRetry: this.retrying });
        if (r.body.status === "PENDING") {
          this.showPending(r.body, r);
          this.say(`You already have seats on hold for this showing: ${seatList(r.body.seats)}. Pay for them or cancel them first.`);
        } else {
          // It ended between the two requests; nothing stands in the way now.
          this.say(`Your earlier hold on this showing has just ended. Press ${button} again${choice.seats ? " to hold these seats" : ""}.`);
        }
      } catch {
        this.say("You already have seats on hold for this showing, but we could not load them. Please reload the page.");
      }
    } else if (e instanceof ApiProblem && e.code === "invalid_request") {
      this.say(choice.seats ? `These seats cannot be booked together: ${e.message}.` : `That number of seats cannot be booked: ${e.message}.`);
    } else if (e instanceof ApiProblem && e.code === "schedule_not_found") {
      this.say("This showing no longer exists.");
    } else if (e instanceof ApiProblem && e.status === 429) {
      this.say(`Too many attempts in a short time. Wait a moment, then press ${button} again.`);
    } else if (e instanceof ApiProblem && e.status >= 500) {
      this.say(`The server could not hold your seats just now; nothing was booked. Please press ${button} again.`);
    } else if (e instanceof NetworkFailure) {
      this.say(UNREACHABLE);
    } else {
      this.say("Your seats could not be held; nothing was booked. Please try again.");
    }
  }

  /** Runs `call` with the guest token, renewing it once if the server no longer accepts it. */
  async withToken(call) {
    const token = await guestToken({ onRetry: this.retrying });
    try {
      return await call(token);
    } catch (e) {
      if (!(e instanceof ApiProblem && e.status === 401)) throw e;
      return call(await guestToken({ onRetry: this.retrying, renew: true }));
    }
  }

  showPending(booking, response) {
    const skew = clockSkew(response.date, response.received);
    let deadline = Date.parse(booking.expiresAt) - skew;
    // The skew is only known to about a second, but a hold never has more
    // than the hold length left once its answer has arrived.
    if (Number.isFinite(this.holdSeconds) && this.holdSeconds > 0) {
      deadline = Math.min(deadline, response.received + this.holdSeconds * 1000);
    }
    this.booking = {
      bookingId: booking.bookingId,
      seats: booking.seats,
      deadline,
    };
    sessionStorage.setItem(this.storageKey, booking.bookingId);
    this.store.setMine(booking.seats);
    this.ui.heldSeats.textContent = seatList(booking.seats);
    // Keyboard users were on Pay or Best available, which are about to
    // disappear: take them to the next step instead of dropping focus on
    // the page body.
    const fromPay = this.ui.choose.contains(document.activeElement) || document.activeElement === document.body;
    this.ui.choose.hidden = true;
    this.ui.payment.hidden = false;
    if (fromPay) this.ui.confirm.focus();
    this.tick();
    clearInterval(this.timer);
    this.timer = setInterval(() => this.tick(), 250);
  }

  tick() {
    if (!this.booking) return;
    const left = this.booking.deadline - Date.now();
    this.ui.countdown.textContent = mmss(left);
    // While a confirm or cancel is on its way the server's answer decides.
    if (left <= 0 && !this.busy) this.finish(EXPIRED);
  }

  /** Ends the payment step: back to choosing seats. */
  finish(message) {
    clearInterval(this.timer);
    this.timer = null;
    this.booking = null;
    this.forget();
    this.store.clearMine();
    const hadFocus = this.ui.payment.contains(document.activeElement);
    this.ui.payment.hidden = true;
    this.ui.choose.hidden = false;
    this.refreshPay();
    if (hadFocus) this.focusGrid();
    if (message) this.say(message);
  }

  forget() {
    sessionStorage.removeItem(this.storageKey);
  }

  refreshPay() {
    this.ui.pay.disabled = this.booking !== null || this.store.selected.size === 0;
    for (const b of [this.ui.pay, this.ui.best]) {
      if (this.busy) b.setAttribute("aria-disabled", "true");
      else b.removeAttribute("aria-disabled");
    }
  }

  async confirm() {
    const b = this.booking;
    if (!b || this.busy) return;
    // Busy, not disabled: disabling the focused button would drop keyboard
    // focus on the page body.
    this.busy = true;
    this.say("Completing the payment…");
    try {
      const token = await guestToken({ onRetry: this.retrying });
      await request(`/api/bookings/${b.bookingId}/confirm`, { method: "POST", token, onRetry: this.retrying });
      // A sale is final, so marking the seats sold before their event arrives
      // can never contradict a later one (a cancel could: the seats may be
      // taken again before our RELEASED event is read).
      this.store.applyEvent("CONFIRMED", b.seats);
      this.finish(`Payment complete. ${seatList(b.seats)} ${b.seats.length === 1 ? "is" : "are"} booked for you.`);
    } catch (e) {
      if (e instanceof ApiProblem && e.code === "booking_expired") {
        this.finish("Too late: your hold expired before the payment went through, so nothing was charged and the seats were released.");
      } else if (e instanceof ApiProblem && e.code === "booking_cancelled") {
        this.finish("This booking was cancelled before the payment went through, so nothing was charged.");
      } else if (e instanceof ApiProblem && e.status === 404) {
        this.finish("This booking no longer exists, so nothing was charged.");
      } else {
        this.say(e instanceof NetworkFailure ? `${UNREACHABLE} Your seats stay held until the time runs out.` : "The payment could not be completed just now. Your seats stay held; please try again.");
      }
    } finally {
      this.busy = false;
      // finish() ran while busy and left the start buttons marked busy.
      this.refreshPay();
    }
  }

  async cancel() {
    const b = this.booking;
    if (!b || this.busy) return;
    // Busy, not disabled: disabling the focused button would drop keyboard
    // focus on the page body.
    this.busy = true;
    this.say("Cancelling…");
    try {
      const token = await guestToken({ onRetry: this.retrying });
      await request(`/api/bookings/${b.bookingId}/cancel`, { method: "POST", token, onRetry: this.retrying });
      this.finish(`Booking cancelled. ${seatList(b.seats)} ${b.seats.length === 1 ? "is" : "are"} available again.`);
    } catch (e) {
      if (e instanceof ApiProblem && e.code === "booking_confirmed") {
        this.finish("This booking is already paid, so it cannot be cancelled.");
      } else if (e instanceof ApiProblem && e.code === "booking_expired") {
        this.finish(EXPIRED);
      } else if (e instanceof ApiProblem && e.status === 404) {
        this.finish("This booking no longer exists.");
      } else {
        this.say(e instanceof NetworkFailure ? UNREACHABLE : "The booking could not be cancelled just now; please try again.");
      }
    } finally {
      this.busy = false;
      // finish() ran while busy and left the start buttons marked busy.
      this.refreshPay();
    }
  }

  /**
   * A RELEASED or CONFIRMED event naming our seats while we think the hold is
   * pending means it ended elsewhere (another tab, or expiry swept before our
   * countdown ran out): ask the server what happened.
   */
  async seatsChanged(event) {
    const b = this.booking;
    if (!b || this.busy || event.action === "OCCUPIED") return;
    const ours = new Set(b.seats.map((s) => `${s.row}:${s.col}`));
    if (!event.seats.some((s) => ours.has(`${s.row}:${s.col}`))) return;
    try {
      const token = await guestToken();
      const r = await request(`/api/bookings/${b.bookingId}`, { token });
      if (this.booking !== b) return;
      if (r.body.status === "EXPIRED") this.finish(EXPIRED);
      else if (r.body.status === "CANCELLED") this.finish("Your hold was cancelled; the seats are available again.");
      else if (r.body.status === "CONFIRMED") this.finish(`Payment complete. ${seatList(b.seats)} ${b.seats.length === 1 ? "is" : "are"} booked for you.`);
    } catch {
      // The countdown still ends the step.
    }
  }
}
