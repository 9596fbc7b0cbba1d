// The list of showings with the seats left in each.

import { request } from "./net.js";
import { formatStart, plural } from "./text.js";

const list = document.getElementById("showings");
const status = document.getElementById("list-status");

async function seatsLeft(s) {
  const { body } = await request(`/api/schedules/${s.id}/seat-status`);
  return s.rows * s.cols - s.blocked.length - body.seats.length;
}

async function main() {
  let schedules;
  try {
    schedules = (await request("/api/schedules", { onRetry: () => (status.textContent = "Connection problem; retrying…") })).body;
  } catch {
    status.textContent = "The showings could not be loaded. Please reload the page.";
    return;
  }
  schedules.sort((a, b) => Date.parse(a.startsAt) - Date.parse(b.startsAt) || a.id - b.id);
  const items = schedules.map((s) => {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = `/schedules/${encodeURIComponent(s.id)}`;
    a.textContent = s.title;
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = formatStart(s.startsAt);
    const left = document.createElement("span");
    left.className = "left";
    left.textContent = "…";
    li.append(a, when, left);
    seatsLeft(s).then(
      (n) => (left.textContent = n > 0 ? `${plural(n, "seat", "seats")} left` : "Sold out"),
      () => (left.textContent = "Seats left unknown"),
    );
    return li;
  });
  list.replaceChildren(...items);
  status.textContent = schedules.length ? plural(schedules.length, "showing", "showings") : "No showings yet.";
}

main();
