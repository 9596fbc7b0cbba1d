// The seat-map page: wires the store, the live feed, the grid and checkout.

import { Checkout } from "./checkout.js";
import { ApiProblem, SeatFeed, request } from "./net.js";
import { SeatStore } from "./store.js";
import { formatStart, justTaken, seatList, seatName } from "./text.js";
import { SeatGrid } from "./view.js";

const $ = (id) => document.getElementById(id);
const message = $("message");

function say(text) {
  message.textContent = text;
}

const CONNECTION_TEXT = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
};

async function main() {
  const match = location.pathname.match(/^\/schedules\/([1-9][0-9]{0,18})$/);
  if (!match) {
    fail("This address does not name a showing.");
    return;
  }
  const scheduleId = Number(match[1]);
  const retrying = (delay) => say(`Connection problem; retrying in ${Math.max(1, Math.round(delay / 1000))} s…`);

  let schedule;
  try {
    schedule = (await request(`/api/schedules/${scheduleId}`, { onRetry: retrying })).body;
  } catch (e) {
    fail(e instanceof ApiProblem && e.status === 404 ? "This showing does not exist." : "The showing could not be loaded. Please reload the page.");
    return;
  }
  say("");
  document.title = `${schedule.title} · seatsync`;
  $("title").textContent = schedule.title;
  $("starts").textContent = formatStart(schedule.startsAt);

  const store = new SeatStore({
    rows: schedule.rows,
    cols: schedule.cols,
    blocked: schedule.blocked,
    maxSelected: schedule.maxSeatsPerBooking,
  });
  const ui = {
    pay: $("pay"),
    best: $("best"),
    quantity: $("quantity"),
    confirm: $("confirm"),
    cancel: $("cancel"),
    choose: $("choose"),
    payment: $("payment"),
    heldSeats: $("held-seats"),
    countdown: $("countdown"),
  };
  let grid = null;
  const checkout = new Checkout({
    scheduleId,
    holdSeconds: schedule.holdSeconds,
    store,
    ui,
    say,
    focusGrid: () => grid && grid.focusActive(),
  });

  const summary = $("summary");
  const chosen = $("chosen");
  const updateSummary = () => {
    const seats = store.selectedSeats();
    summary.textContent = `${seats.length} of ${store.maxSelected} selected`;
    chosen.textContent = seats.length ? seatList(seats) : "";
    checkout.refreshPay();
  };
  store.subscribe((changed, taken) => {
    updateSummary();
    // Our own OCCUPIED event can beat the 201 of our start; those seats
    // were not taken by someone else.
    taken = taken.filter((s) => !checkout.requesting(s));
    if (taken.length) {
      const left = store.selected.size;
      say(`${justTaken(taken)} ${left ? "The rest of your selection is kept." : "Please choose other seats."}`);
    }
  });

  grid = new SeatGrid($("grid"), store, {
    onActivate(i) {
      if (checkout.booking) {
        say("Finish or cancel the payment for your held seats before choosing more.");
        return;
      }
      const { row, col } = store.seat(i);
      const result = store.toggle(i);
      if (result === "limit") say(`You can choose at most ${store.maxSelected} seats per booking. Unselect one to choose ${seatName(row, col)}.`);
      else if (result === "unavailable") say(`${seatName(row, col)} is ${store.state(i) === "yours" ? "held for you" : store.state(i)} and cannot be chosen.`);
      else if (result === "selected") say(`${seatName(row, col)} selected.`);
      else say(`${seatName(row, col)} unselected.`);
    },
  });
  grid.draw();
  updateSummary();

  const connection = $("connection");
  const feed = new SeatFeed(scheduleId, store, {
    onConnection(state) {
      connection.dataset.state = state;
      connection.textContent = CONNECTION_TEXT[state] || state;
    },
    onEvent(event) {
      checkout.seatsChanged(event);
    },
    onRetry: retrying,
  });
  try {
    await feed.start();
  } catch {
    say("The seat map could not be loaded. Please reload the page.");
    return;
  }
  await checkout.restore();
}

function fail(text) {
  say(text);
  // Nothing can be booked on a page without a showing.
  for (const id of ["pay", "best", "quantity"]) $(id).disabled = true;
}

main();
