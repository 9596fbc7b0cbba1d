// The seat grid: one <button> per seat, drawn once; afterwards only the
// buttons a store change names are touched. Keyboard use follows the
// WAI-ARIA grid pattern: one tab stop (roving tabindex), arrow keys move.

import { seatName } from "./text.js";

export class SeatGrid {
  /**
   * @param {HTMLElement} root the grid container
   * @param {import("./store.js").SeatStore} store
   * @param {{onActivate: (i: number) => void}} handlers
   */
  constructor(root, store, { onActivate }) {
    this.root = root;
    this.store = store;
    this.onActivate = onActivate;
    this.buttons = [];
    this.active = 0;
    store.subscribe((changed) => {
      for (const i of changed) this.paint(i);
    });
  }

  draw() {
    const t0 = performance.now();
    const { rows, cols } = this.store;
    const root = this.root;
    root.replaceChildren();
    // Custom properties set through the CSSOM are allowed by a strict CSP
    // (unlike a style attribute in markup).
    root.style.setProperty("--cols", String(cols));
    root.classList.toggle("compact", cols > 30);
    const frag = document.createDocumentFragment();
    const stage = document.createElement("span");
    stage.className = "stage";
    stage.setAttribute("aria-hidden", "true");
    stage.textContent = "Stage";
    frag.append(stage);
    const corner = document.createElement("span");
    corner.className = "label corner";
    corner.setAttribute("aria-hidden", "true");
    frag.append(corner);
    for (let c = 1; c <= cols; c++) {
      const l = document.createElement("span");
      l.className = "label col";
      l.setAttribute("aria-hidden", "true");
      l.textContent = String(c);
      frag.append(l);
    }
    const buttons = new Array(rows * cols);
    for (let r = 1; r <= rows; r++) {
      const l = document.createElement("span");
      l.className = "label row";
      l.setAttribute("aria-hidden", "true");
      l.textContent = String(r);
      frag.append(l);
      for (let c = 1; c <= cols; c++) {
        const i = (r - 1) * cols + (c - 1);
        const b = document.createElement("button");
        b.type = "button";
        b.tabIndex = -1;
        b.seatIndex = i;
        buttons[i] = b;
        this.paintButton(b, i);
        frag.append(b);
      }
    }
    this.buttons = buttons;
    root.append(frag);
    this.active = this.firstFree();
    if (buttons[this.active]) buttons[this.active].tabIndex = 0;
    root.addEventListener("click", (e) => this.click(e));
    root.addEventListener("keydown", (e) => this.key(e));
    root.addEventListener("focusin", (e) => {
      if (e.target.seatIndex !== undefined) this.setActive(e.target.seatIndex, false);
    });
    performance.measure("seatsync:draw", { start: t0, end: performance.now() });
    // Style, layout and paint of the new grid happen after this script; the
    // task after the next frame marks when the full grid was on screen.
    requestAnimationFrame(() =>
      setTimeout(() => performance.measure("seatsync:drawn", { start: t0, end: performance.now() }), 0),
    );
  }

  firstFree() {
    for (let i = 0; i < this.store.size; i++) if (this.store.isFree(i)) return i;
    return 0;
  }

  paint(i) {
    const b = this.buttons[i];
    if (b) this.paintButton(b, i);
  }

  paintButton(b, i) {
    const state = this.store.state(i);
    // Skip untouched buttons: attribute writes are what makes a repaint slow.
    if (b.seatState === state) return;
    b.seatState = state;
    const { row, col } = this.store.seat(i);
    b.className = `seat s-${state}`;
    b.setAttribute("aria-label", `${seatName(row, col)}, ${state}`);
    b.setAttribute("aria-pressed", state === "selected" ? "true" : "false");
    if (state === "available" || state === "selected") b.removeAttribute("aria-disabled");
    else b.setAttribute("aria-disabled", "true");
  }

  click(e) {
    const b = e.target.closest("button");
    if (!b || b.seatIndex === undefined) return;
    this.setActive(b.seatIndex, false);
    this.onActivate(b.seatIndex);
  }

  setActive(i, focus) {
    if (i === this.active && !focus) return;
    const old = this.buttons[this.active];
    if (old) old.tabIndex = -1;
    this.active = i;
    const b = this.buttons[i];
    b.tabIndex = 0;
    if (focus) b.focus();
  }

  focusActive() {
    const b = this.buttons[this.active];
    if (b) b.focus();
  }

  key(e) {
    const b = e.target;
    if (b.seatIndex === undefined) return;
    const { rows, cols } = this.store;
    const i = b.seatIndex;
    const r = Math.floor(i / cols);
    const c = i % cols;
    let next = null;
    switch (e.key) {
      case "ArrowRight":
        next = c + 1 < cols ? i + 1 : null;
        break;
      case "ArrowLeft":
        next = c > 0 ? i - 1 : null;
        break;
      case "ArrowDown":
        next = r + 1 < rows ? i + cols : null;
        break;
      case "ArrowUp":
        next = r > 0 ? i - cols : null;
        break;
      case "Home":
        next = e.ctrlKey ? 0 : r * cols;
        break;
      case "End":
        next = e.ctrlKey ? rows * cols - 1 : r * cols + cols - 1;
        break;
      case "PageDown":
        next = Math.min(r + 5, rows - 1) * cols + c;
        break;
      case "PageUp":
        next = Math.max(r - 5, 0) * cols + c;
        break;
      default:
        return;
    }
    e.preventDefault();
    if (next !== null) this.setActive(next, true);
  }
}
