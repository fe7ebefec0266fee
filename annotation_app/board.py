"""The rank board: the responses' labels as chips in rank slots, ranked by drag or by keyboard.

One :class:`gradio.HTML` component whose value is a small JSON document,
``{"labels": ["A", "B", "C", "D"], "ranking": "C > B = D > A"}``. The page's Python side sets
it when an item is shown or the typed ranking changes (:func:`board_value`); the browser side
(:data:`BOARD_JS`) draws one slot per rank plus an *Unranked* slot, lets the annotator move chips
between them, and writes the new ranking straight into the page's ranking field, which stays the
one source of what is submitted and is never a server round trip behind the board; its own
``input`` event carries the new value to the server, which saves the draft
(:func:`board_ranking`). Chips in one slot are a tie.

Mouse: drag a chip into a slot (or click a chip, then click a slot). Keyboard (one Tab stop, a
roving focus as in the WAI-ARIA Authoring Practices' toolbar pattern,
https://www.w3.org/WAI/ARIA/apg/patterns/toolbar/): ←/→ move the focus between chips, a
response's letter focuses its chip, a digit puts the focused chip in that rank, ``=`` ties it
with the chip placed last, ``0``/Backspace unranks it, Enter submits.

Nothing from a response is drawn here, only labels (single capital letters, checked before
drawing), and the board builds its DOM with ``textContent``, never ``innerHTML``.
"""

from __future__ import annotations

import json

# The template is static: everything is drawn by BOARD_JS from the value, never interpolated.
BOARD_HTML = '<div class="rank-board" role="group" aria-label="Ranking board"></div>'

BOARD_CSS = """
.rank-board { display: flex; flex-direction: column; gap: 6px; }
.rank-board .order { font-size: 1rem; font-weight: 600; min-height: 1.4rem; }
.rank-board .order .tier { display: inline-flex; gap: 3px; }
.rank-board .order .op { margin: 0 6px; opacity: 0.7; }
.rank-board .slots { display: flex; gap: 6px; flex-wrap: wrap; }
.rank-board .slot { flex: 1 1 0; min-width: 90px; min-height: 40px; border: 2px dashed #9ca3af;
  border-radius: 8px; padding: 4px 6px; display: flex; align-items: center; gap: 4px; flex-wrap: wrap; }
.rank-board .slot.pool { border-style: dotted; background: rgba(156, 163, 175, 0.08); }
.rank-board .slot.over { border-color: #f97316; background: rgba(249, 115, 22, 0.10); }
.rank-board .slot-name { font-size: 0.8rem; opacity: 0.75; margin-right: 4px; }
.rank-board .chip { font: 700 15px/1 sans-serif; min-width: 34px; height: 30px; padding: 0 10px; margin: 0;
  display: inline-flex; align-items: center; justify-content: center; border-radius: 15px; cursor: grab;
  border: 1px solid #6b7280; background: #fff7ed; color: #111827; }
.rank-board .chip-static { font: 700 16px/1 sans-serif; padding: 0 2px; }
.rank-board .chip.picked { outline: 3px solid #f97316; }
.rank-board .chip:focus-visible, .rank-board .chip:focus { outline: 3px solid #2563eb; outline-offset: 2px; }
.rank-board .keys { font-size: 0.78rem; opacity: 0.75; }
"""

BOARD_JS = r"""
const ORDINALS = ['1st', '2nd', '3rd'];
const board = element.querySelector('.rank-board');
let state = { labels: [], slots: {}, focus: null, picked: null, last: null, ranking: '' };

function parseValue(raw) {
  try {
    const v = JSON.parse(raw || '{}');
    const labels = (v.labels || []).filter((l) => /^[A-Z]$/.test(l));
    return { labels, ranking: typeof v.ranking === 'string' ? v.ranking : '' };
  } catch (e) {
    return { labels: [], ranking: '' };
  }
}

function slotsFromRanking(labels, ranking) {
  // The server sends canonical text ("C > B = D"); anything else leaves every chip unranked.
  const slots = {};
  labels.forEach((l) => { slots[l] = 0; });
  ranking.split('>').map((t) => t.split('=').map((s) => s.trim()).filter(Boolean))
    .filter((t) => t.length).forEach((tier, i) => {
      tier.forEach((l) => { if (l in slots) slots[l] = i + 1; });
    });
  return slots;
}

function rankingText() {
  const bySlot = {};
  state.labels.forEach((l) => {
    const s = state.slots[l];
    if (s > 0) (bySlot[s] = bySlot[s] || []).push(l);
  });
  return Object.keys(bySlot).map(Number).sort((a, b) => a - b)
    .map((s) => bySlot[s].sort().join(' = ')).join(' > ');
}

function make(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function chip(label) {
  const c = make('button', 'chip', label);
  c.type = 'button';
  c.draggable = true;
  c.dataset.label = label;
  c.id = 'chip-' + label;
  c.setAttribute('aria-label', 'Response ' + label + (state.slots[label] ? ', rank ' + state.slots[label] : ', not ranked'));
  c.tabIndex = label === (state.focus || state.labels[0]) ? 0 : -1;
  if (state.picked === label) c.classList.add('picked');
  c.addEventListener('dragstart', (e) => { e.dataTransfer.setData('text/plain', label); e.dataTransfer.effectAllowed = 'move'; });
  c.addEventListener('click', (e) => { e.stopPropagation(); state.focus = label; state.picked = state.picked === label ? null : label; draw(true); });
  c.addEventListener('keydown', (e) => onKey(e, label));
  return c;
}

function slotBox(rank) {
  const box = make('div', rank ? 'slot' : 'slot pool');
  box.dataset.rank = String(rank);
  box.id = rank ? 'slot-rank-' + rank : 'slot-unranked';
  box.appendChild(make('span', 'slot-name', rank ? (ORDINALS[rank - 1] || rank + 'th') : 'Unranked'));
  state.labels.filter((l) => state.slots[l] === rank).sort().forEach((l) => box.appendChild(chip(l)));
  box.addEventListener('dragover', (e) => { e.preventDefault(); box.classList.add('over'); });
  box.addEventListener('dragleave', () => box.classList.remove('over'));
  box.addEventListener('drop', (e) => {
    e.preventDefault();
    box.classList.remove('over');
    const label = e.dataTransfer.getData('text/plain');
    if (label in state.slots) place(label, rank);
  });
  box.addEventListener('click', () => { if (state.picked) { const l = state.picked; state.picked = null; place(l, rank); } });
  return box;
}

function orderLine() {
  const line = make('div', 'order');
  line.setAttribute('aria-live', 'polite');
  const text = rankingText();
  line.dataset.ranking = text;
  if (!text) { line.textContent = state.labels.length ? 'Order: nothing ranked yet' : ''; return line; }
  line.appendChild(make('span', 'slot-name', 'Order:'));
  text.split(' > ').forEach((tier, i) => {
    if (i) line.appendChild(make('span', 'op', '>'));
    const t = make('span', 'tier');
    tier.split(' = ').forEach((l, j) => {
      if (j) t.appendChild(make('span', 'op', '='));
      t.appendChild(make('span', 'chip-static', l));
    });
    line.appendChild(t);
  });
  return line;
}

function draw(keepFocus) {
  const hadFocus = keepFocus || board.contains(document.activeElement);
  board.replaceChildren();
  if (!state.labels.length) return;
  board.appendChild(orderLine());
  const slots = make('div', 'slots');
  for (let r = 1; r <= state.labels.length; r++) slots.appendChild(slotBox(r));
  slots.appendChild(slotBox(0));
  board.appendChild(slots);
  board.appendChild(make('div', 'keys',
    'Drag a response into a rank (same rank = tie), or with the keyboard: a letter or ←/→ picks a response, '
    + '1–' + state.labels.length + ' ranks it, = ties it with the last one placed, 0 unranks, Enter submits.'));
  if (hadFocus && state.focus) { const c = board.querySelector('#chip-' + state.focus); if (c) c.focus(); }
}

function place(label, rank) {
  state.slots[label] = rank;
  state.focus = label;
  if (rank) state.last = label;
  send();
  draw(true);
}

function send() {
  // The board is a view of the ranking field: write the new ranking there at once, so Submit and
  // Enter, which read the field, are never a round trip behind the board.
  state.ranking = rankingText();
  props.value = JSON.stringify({ labels: state.labels, ranking: state.ranking });
  const field = document.querySelector('#ranking textarea, #ranking input');
  if (field) {
    field.value = state.ranking;
    field.dispatchEvent(new Event('input', { bubbles: true }));
  }
  trigger('input');  // a scripted edit of the field is not a Gradio "input" event: save the draft here
}

function onKey(e, label) {
  const i = state.labels.indexOf(label);
  const k = e.key;
  const n = state.labels.length;
  if (k === 'ArrowRight' || k === 'ArrowDown') { state.focus = state.labels[(i + 1) % n]; draw(true); }
  else if (k === 'ArrowLeft' || k === 'ArrowUp') { state.focus = state.labels[(i - 1 + n) % n]; draw(true); }
  else if (/^[1-9]$/.test(k) && Number(k) <= n) place(label, Number(k));
  else if (k === '0' || k === 'Backspace' || k === 'Delete') place(label, 0);
  else if (k === '=') {
    const other = state.last && state.last !== label ? state.last : null;
    if (other && state.slots[other]) place(label, state.slots[other]);
  }
  else if (k === 'Enter') { const b = document.getElementById('submit'); if (b) b.click(); }
  else if (/^[a-zA-Z]$/.test(k) && state.labels.includes(k.toUpperCase())) { state.focus = k.toUpperCase(); draw(true); }
  else return;
  e.preventDefault();
  e.stopPropagation();
}

function load() {
  const v = parseValue(props.value);
  if (v.labels.join() === state.labels.join() && v.ranking === state.ranking) return;  // our own echo
  const fresh = v.labels.join() !== state.labels.join();
  state.labels = v.labels;
  state.slots = slotsFromRanking(v.labels, v.ranking);
  state.ranking = v.ranking;
  if (fresh) { state.focus = v.labels[0] || null; state.picked = null; state.last = null; }
  draw(false);
}

load();
watch('value', load);
"""


def board_value(labels: list[str], ranking: str) -> str:
    """The board's value for an item with ``labels`` and the (canonical, maybe partial) ranking."""
    return json.dumps({"labels": list(labels), "ranking": ranking})


def board_ranking(value: str | None) -> str:
    """The ranking text a board value carries (``""`` for an empty or malformed value)."""
    try:
        ranking = json.loads(value or "{}").get("ranking", "")
    except (json.JSONDecodeError, AttributeError):
        return ""
    return ranking if isinstance(ranking, str) else ""
