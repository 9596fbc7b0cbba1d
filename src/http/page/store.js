// The one seat store: what the server says about every seat (free, held,
// sold), plus what is local to this viewer (blocked layout, the selection,
// the seats of the viewer's own pending booking). Every change reports
// exactly the seat indices it touched, so the view repaints only those.

const FREE = 0;
const HELD = 1;
const SOLD = 2;

export class SeatStore {
  constructor({ rows, cols, blocked, maxSelected }) {
    this.rows = rows;
    this.cols = cols;
    this.maxSelected = maxSelected;
    // Typed arrays: a 100 x 100 hall is 10,000 entries, read on every paint.
    this.server = new Uint8Array(rows * cols);
    this.blocked = new Uint8Array(rows * cols);
    for (const s of blocked) {
      if (this.inside(s)) this.blocked[this.index(s.row, s.col)] = 1;
    }
    this.selected = new Set();
    this.mine = new Set();
    this.listeners = [];
  }

  get size() {
    return this.rows * this.cols;
  }

  inside(s) {
    return Number.isInteger(s.row) && Number.isInteger(s.col) && s.row >= 1 && s.row <= this.rows && s.col >= 1 && s.col <= this.cols;
  }

  index(row, col) {
    return (row - 1) * this.cols + (col - 1);
  }

  seat(i) {
    return { row: Math.floor(i / this.cols) + 1, col: (i % this.cols) + 1 };
  }

  /** One of: available, selected, held, sold, yours, blocked. */
  state(i) {
    if (this.blocked[i]) return "blocked";
    const s = this.server[i];
    if (s === SOLD) return "sold";
    if (s === HELD) return this.mine.has(i) ? "yours" : "held";
    return this.selected.has(i) ? "selected" : "available";
  }

  /** Seats that can be chosen right now. */
  isFree(i) {
    return !this.blocked[i] && this.server[i] === FREE;
  }

  /** Listener gets (indices, takenFromSelection) after every change. */
  subscribe(fn) {
    this.listeners.push(fn);
  }

  notify(changed, taken = []) {
    if (changed.length === 0 && taken.length === 0) return;
    for (const fn of this.listeners) fn(changed, taken);
  }

  /** A seat event from the stream: only the named seats change. */
  applyEvent(action, seats) {
    const next = action === "RELEASED" ? FREE : action === "CONFIRMED" ? SOLD : action === "OCCUPIED" ? HELD : null;
    if (next === null) return;
    const changed = [];
    const taken = [];
    for (const s of seats) {
      if (!this.inside(s)) continue;
      const i = this.index(s.row, s.col);
      if (this.server[i] === next) continue;
      this.server[i] = next;
      if (next !== FREE && this.selected.delete(i)) taken.push(this.seat(i));
      changed.push(i);
    }
    this.notify(changed, taken);
  }

  /** A full snapshot (seat-status): repaints only the seats whose state differs. */
  loadSnapshot(seats) {
    const next = new Uint8Array(this.size);
    for (const s of seats) {
      if (this.inside(s)) next[this.index(s.row, s.col)] = s.status === "CONFIRMED" ? SOLD : HELD;
    }
    const changed = [];
    const taken = [];
    for (let i = 0; i < next.length; i++) {
      if (next[i] === this.server[i]) continue;
      this.server[i] = next[i];
      if (next[i] !== FREE && this.selected.delete(i)) taken.push(this.seat(i));
      changed.push(i);
    }
    this.notify(changed, taken);
  }

  /**
   * The server refused these seats (409 seats_taken): they are unavailable
   * now, whether or not their event has reached us yet.
   */
  markTaken(seats) {
    const changed = [];
    for (const s of seats) {
      if (!this.inside(s)) continue;
      const i = this.index(s.row, s.col);
      this.selected.delete(i);
      if (this.server[i] === FREE) this.server[i] = HELD;
      changed.push(i);
    }
    this.notify(changed);
  }

  /** Selects or unselects a free seat: "selected", "unselected", "limit" or "unavailable". */
  toggle(i) {
    if (this.selected.has(i)) {
      this.selected.delete(i);
      this.notify([i]);
      return "unselected";
    }
    if (!this.isFree(i)) return "unavailable";
    if (this.selected.size >= this.maxSelected) return "limit";
    this.selected.add(i);
    this.notify([i]);
    return "selected";
  }

  selectedSeats() {
    return [...this.selected].sort((a, b) => a - b).map((i) => this.seat(i));
  }

  clearSelection() {
    const changed = [...this.selected];
    this.selected.clear();
    this.notify(changed);
  }

  /**
   * The viewer's own pending booking. Its seats are held by the server the
   * moment `start` answered 201, before the OCCUPIED event arrives.
   */
  setMine(seats) {
    const changed = [...this.mine];
    this.mine.clear();
    for (const s of seats) {
      if (!this.inside(s)) continue;
      const i = this.index(s.row, s.col);
      this.mine.add(i);
      this.selected.delete(i);
      if (this.server[i] === FREE) this.server[i] = HELD;
      changed.push(i);
    }
    this.notify(changed);
  }

  clearMine() {
    const changed = [...this.mine];
    this.mine.clear();
    this.notify(changed);
  }

  /** Counts for the showing's summary. */
  counts() {
    let free = 0;
    for (let i = 0; i < this.size; i++) if (this.isFree(i)) free++;
    return { free };
  }
}
