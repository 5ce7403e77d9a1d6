// The status page: reads api/status about once a second and updates the page in place (no
// reloads). Rates are the change of a counter between two readings, over the server's own
// clock (its uptime), so they do not depend on this browser's timers.
"use strict";

const PERIOD_MS = 1000;
let previous = null; // the last reading: {uptime, totals, routes, processors}

const $ = (id) => document.getElementById(id);
const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const decimal = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });

function count(n) {
  return integer.format(n);
}

function rate(n) {
  if (n === null || !isFinite(n)) return "–";
  return n >= 100 ? integer.format(n) : decimal.format(n);
}

function duration(seconds) {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  const parts = d ? [`${d}d`, `${h}h`, `${m}m`] : h ? [`${h}h`, `${m}m`] : [`${m}m`];
  return `${parts.join(" ")} ${s % 60}s`.replace(/^0m /, "");
}

function when(iso) {
  const date = new Date(iso);
  return isNaN(date) ? String(iso) : date.toLocaleString();
}

function setText(id, text) {
  const node = $(id);
  if (node.textContent !== text) node.textContent = text;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function fill(tableId, rows, columns, empty) {
  const body = document.querySelector(`#${tableId} tbody`);
  const fresh = document.createDocumentFragment();
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = cell(empty, "empty");
    td.colSpan = columns;
    tr.append(td);
    fresh.append(tr);
  }
  for (const cells of rows) {
    const tr = document.createElement("tr");
    tr.append(...cells);
    fresh.append(tr);
  }
  body.replaceChildren(fresh);
}

function perSecond(now, before, key, seconds) {
  if (!before || seconds <= 0) return null;
  return Math.max(0, now - before[key]) / seconds;
}

function mimValue(value) {
  if (value === null) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? count(value) : String(value);
  if (typeof value === "string" && /^\d{4}-\d\d-\d\dT/.test(value)) return when(value);
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function render(s) {
  const seconds = previous ? s.uptime - previous.uptime : 0;
  const totals = s.totals;
  const before = previous ? previous.totals : null;

  document.title = `${s.workflow} · mzconnector`;
  setText("workflow", s.workflow);
  setText(
    "engine",
    s.engine === "local" ? "workflow server" : `${s.engine} engine · ${s.role} ${s.instance}`,
  );
  setText("uptime", duration(s.uptime));
  setText("started", when(s.started));

  const badge = $("readiness");
  badge.textContent = s.ready ? "ready" : s.phase === "ready" ? "not ready" : s.phase;
  badge.className = "badge " + (s.ready ? "ready" : s.phase === "ready" ? "not-ready" : s.phase);
  const reasons = $("reasons");
  reasons.hidden = s.ready;
  setText("reasons", s.reasons.join("; "));

  setText("rate-in", rate(perSecond(totals.records_in, before, "records_in", seconds)));
  setText("rate-out", rate(perSecond(totals.records_out, before, "records_out", seconds)));
  setText("total-in", count(totals.records_in));
  setText("total-out", count(totals.records_out));
  setText("total-refused", count(totals.records_refused));
  setText("total-undeliverable", count(totals.undeliverable));
  setText("clients-open", count(totals.connections_open));
  setText("clients-accepted", count(totals.connections_accepted));
  setText("clients-refused", count(totals.connections_refused));
  setText("total-errors", count(totals.processor_errors));
  $("total-errors").closest(".card").classList.toggle("alert", totals.processor_errors > 0);

  const oldRoutes = new Map((previous ? previous.routes : []).map((r) => [r.route, r]));
  fill(
    "routes",
    s.routes.map((r) => [
      cell(r.route, "name"),
      cell(r.consumer),
      cell(rate(perSecond(r.records, oldRoutes.get(r.route), "records", seconds)), "num"),
      cell(count(r.records), "num"),
      cell(count(r.batches), "num"),
      cell(count(r.queued), "num"),
    ]),
    6,
    "no routes",
  );

  const oldProcessors = new Map((previous ? previous.processors : []).map((p) => [p.name, p]));
  fill(
    "processors",
    s.processors.map((p) => {
      const old = oldProcessors.get(p.name);
      const busy = perSecond(p.busy, old, "busy", seconds);
      const busyCell = cell("", "num");
      const bar = document.createElement("span");
      bar.className = "bar";
      const fillBar = document.createElement("i");
      fillBar.style.width = `${Math.min(100, (busy || 0) * 100)}%`;
      bar.append(fillBar);
      busyCell.append(bar, busy === null ? "–" : `${decimal.format(busy * 100)}%`);
      return [
        cell(p.name, "name"),
        cell(p.routes.join(", ")),
        cell(rate(perSecond(p.records, old, "records", seconds)), "num"),
        cell(count(p.records), "num"),
        cell(count(p.errors), p.errors > 0 ? "num bad" : "num"),
        busyCell,
      ];
    }),
    6,
    "no processors",
  );

  setText("clients-count", s.clients.length ? `(${s.clients.length})` : "");
  fill(
    "clients",
    s.clients.map((c) => [
      cell(String(c.id), "num"),
      cell(c.name || "unnamed", c.name ? "name" : "muted"),
      cell(c.peer),
      cell(c.user || "–", "wrap"),
      cell(when(c.since)),
      cell(count(c.records_in), "num"),
      cell(count(c.records_out), "num"),
    ]),
    7,
    "no client is connected",
  );

  fill(
    "mim",
    s.mim.map((m) => [
      cell(m.name, "name"),
      cell(mimValue(m.value), "wrap"),
      cell(m.builtin ? "built-in" : m.type, "muted"),
    ]),
    3,
    "no MIM values",
  );

  setText("updated", `updated ${new Date().toLocaleTimeString()}`);
  previous = s;
}

async function poll() {
  try {
    const response = await fetch("api/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
  } catch (error) {
    const badge = $("readiness");
    badge.textContent = "unreachable";
    badge.className = "badge not-ready";
    setText("updated", `cannot reach the server (${error.message}); retrying`);
  } finally {
    setTimeout(poll, PERIOD_MS);
  }
}

poll();
