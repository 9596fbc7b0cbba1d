// Sentences shown to people. Kept apart so every message reads the same way
// wherever it comes from (a 409, a stream event, a countdown).

export function seatName(row, col) {
  return `Row ${row}, seat ${col}`;
}

/** "Row 1, seat 5", "Row 1, seats 5 and 6", "Row 1, seats 5, 6 and 7; Row 2, seat 1". */
export function seatList(seats) {
  const byRow = new Map();
  for (const s of [...seats].sort((a, b) => a.row - b.row || a.col - b.col)) {
    if (!byRow.has(s.row)) byRow.set(s.row, []);
    byRow.get(s.row).push(s.col);
  }
  return [...byRow]
    .map(([row, cols]) => (cols.length === 1 ? `Row ${row}, seat ${cols[0]}` : `Row ${row}, seats ${and(cols)}`))
    .join("; ");
}

export function and(items) {
  if (items.length <= 1) return items.join("");
  return `${items.slice(0, -1).join(", ")} and ${items[items.length - 1]}`;
}

/** "Row 1, seat 5 was just taken" / "Row 1, seats 5 and 6 were just taken". */
export function justTaken(seats) {
  const plural = seats.length > 1;
  return `${seatList(seats)} ${plural ? "were" : "was"} just taken by someone else.`;
}

export function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

export function formatStart(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toLocaleString(undefined, { dateStyle: "full", timeStyle: "short" });
}

export function mmss(ms) {
  const total = Math.max(0, Math.ceil(ms / 1000));
  const m = Math.floor(total / 60);
  const s = total % 60;
  return `${m}:${String(s).padStart(2, "0")}`;
}

/**
 * The answer to a best-available request that found no block of `quantity`
 * seats (409 no_seats_together), offering the largest party that still fits.
 */
export function noSeatsTogether(quantity, largest) {
  if (!(largest > 0)) {
    return "Every seat is taken or on hold right now, so nothing was held. Seats on hold come free again if they are not paid for in time.";
  }
  const most = largest === 1 ? "only single seats are free" : `the most together is ${largest}`;
  return `No ${quantity} seats together are left; ${most}. Try ${largest}, or pick seats yourself.`;
}

/** The best-available button's text: "Best available: 2 seats". */
export function bestLabel(quantity) {
  return `Best available: ${plural(quantity, "seat", "seats")}`;
}
