// samtrain's dashboard: two views over the coordinator's /ui/api, polled
// once a second. "#/" lists the jobs; "#/job/<id>" shows one job. Every
// value from the API goes into the page as text, never as markup.
"use strict";

const POLL_MS = 1000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
let timer = null;
// Each refresh's number: an answer to an older one (the page moved on
// meanwhile) is dropped, and only the newest schedules the next poll.
let latest = 0;

// An element with attributes and children (strings become text nodes).
function h(tag, attrs, ...children) {
  const svg = ["svg", "polyline", "line", "text", "circle", "g"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag)
                 : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path, options) {
  const r = await fetch("/ui/api/" + path, Object.assign({ credentials: "same-origin" }, options));
  // Refused (the login expired, or the coordinator's tokens changed): the
  // page reloads as the login page.
  if (r.status === 401) location.reload();
  const body = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function ago(ms) {
  if (ms === null || ms === undefined) return "–";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return s.toFixed(1) + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  return Math.floor(s / 3600) + " h ago";
}

function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "–";
}

function num(x, digits) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–";
}

function state(s) {
  return h("span", { class: "state " + s }, s);
}

function setStatus(text, bad) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.className = "status" + (bad ? " bad" : "");
}

function show(...nodes) {
  document.getElementById("main").replaceChildren(...nodes);
}

// ---------------------------------------------------------------- jobs ---

async function listView(seq) {
  const { jobs } = await api("jobs");
  if (seq !== latest) return;
  const rows = jobs.map((j) =>
    h("tr", { class: "link", "data-job": j.id, onclick: () => { location.hash = "#/job/" + j.id; } },
      h("td", {}, h("a", { href: "#/job/" + j.id }, j.id)),
      h("td", {}, j.name),
      h("td", {}, state(j.state)),
      h("td", {}, j.step + " / " + j.total_steps),
      h("td", {}, num(j.loss, 4)),
      h("td", {}, j.world_size ? j.world_size + " (dp " + j.dp + " × tp " + j.tp + ")" : "–"),
      h("td", {}, j.generation),
      h("td", {}, when(j.created_unix_ms))));
  document.title = "samtrain: jobs";
  show(h("div", { class: "panel" },
    h("h2", {}, "Jobs"),
    jobs.length === 0 ? h("p", { class: "muted" }, "No jobs yet: samtrain submit job.toml")
      : h("table", { id: "jobs" },
        h("thead", {}, h("tr", {}, ["job", "name", "state", "step", "loss", "workers", "generation", "created"].map((t) => h("th", {}, t)))),
        h("tbody", {}, rows))));
}

// ----------------------------------------------------------------- job ---

function lossChart(points) {
  const W = 720, H = 260, L = 56, R = 16, T = 12, B = 30;
  const svg = h("svg", { class: "chart", id: "loss", viewBox: `0 0 ${W} ${H}`, "data-points": points.length });
  if (points.length === 0) {
    svg.append(h("text", { x: L, y: H / 2 }, "no loss reported yet"));
    return svg;
  }
  const steps = points.map((p) => p[0]), losses = points.map((p) => p[1]);
  const x0 = Math.min(...steps), x1 = Math.max(...steps, x0 + 1);
  let y0 = Math.min(...losses), y1 = Math.max(...losses);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const x = (s) => L + ((s - x0) / (x1 - x0)) * (W - L - R);
  const y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4;
    svg.append(h("line", { class: "grid-line", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    svg.append(h("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(3)));
  }
  svg.append(h("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  svg.append(h("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  for (const [s, anchor] of [[x0, "start"], [Math.round((x0 + x1) / 2), "middle"], [x1, "end"]]) {
    svg.append(h("text", { x: x(s), y: H - B + 16, "text-anchor": anchor }, "step " + s));
  }
  svg.append(h("polyline", { class: "curve", points: points.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ") }));
  const last = points[points.length - 1];
  svg.append(h("circle", { class: "last", cx: x(last[0]), cy: y(last[1]), r: 3.5 }));
  return svg;
}

function describeEvent(e) {
  const ev = e.event || {};
  if (ev.state) return ["state", ev.state + " (generation " + ev.generation + ")" + (ev.message ? ": " + ev.message : "")];
  if (ev.checkpoint) return ["checkpoint", "committed step " + ev.checkpoint.step + " at " + ev.checkpoint.url];
  if (ev.checkpoint_failed) return ["checkpoint", "not saved (step " + ev.checkpoint_failed.step + "): " + ev.checkpoint_failed.reason];
  if (ev.straggler) return ["straggler", "rank " + ev.straggler.rank + " computes " + num(ev.straggler.compute_s, 3) + " s a step, the median " + num(ev.straggler.median_compute_s, 3) + " s" + (ev.straggler.replace ? "; replacing it" : "")];
  if (ev.restarted) return [ev.restarted.resize ? "resize" : "restart", "generation " + ev.restarted.ended_generation + " → " + ev.restarted.next_generation + ": " + ev.restarted.reason];
  if (ev.finished) return ["finished", ev.finished.state + " at step " + ev.finished.step + (ev.finished.message ? ": " + ev.finished.message : "")];
  return ["event", JSON.stringify(ev)];
}

function ranksTable(job) {
  if (!job.members.length) return h("p", { class: "muted" }, "No generation is running.");
  return h("table", { id: "ranks" },
    h("thead", {}, h("tr", {}, ["rank", "dp × tp", "worker", "node", "step", "step time", "data", "compute", "comm", "last report"].map((t) => h("th", {}, t)))),
    h("tbody", {}, job.members.map((m) => {
      const at = (job.ranks || []).find((r) => r.rank === m.rank) || {};
      return h("tr", { "data-rank": m.rank },
        h("td", {}, m.rank),
        h("td", {}, at.dp_rank !== undefined ? at.dp_rank + " × " + at.tp_rank : "–"),
        h("td", {}, m.name || m.worker_id, m.straggler ? h("span", { class: "flag" }, " straggler") : null),
        h("td", { class: "mono" }, (at.node || m.host) + (at.local_rank !== undefined ? " #" + at.local_rank : "")),
        h("td", {}, m.step),
        h("td", {}, m.last_report_unix_ms ? num(m.compute_s + m.comm_s, 3) + " s" : "–"),
        h("td", {}, m.last_report_unix_ms ? num(m.data_s, 3) + " s" : "–"),
        h("td", {}, m.last_report_unix_ms ? num(m.compute_s - m.data_s, 3) + " s" : "–"),
        h("td", {}, m.last_report_unix_ms ? num(m.comm_s, 3) + " s" : "–"),
        h("td", {}, ago(m.last_report_unix_ms)));
    })));
}

function evalPanel(job) {
  const e = job.eval;
  if (!e) return h("p", { class: "muted" }, TERMINAL.has(job.state) ? "No evaluation." : "After training.");
  const examples = job.eval_examples || [];
  return h("div", { id: "eval" },
    h("div", { class: "grid" },
      [["CIDEr", e.cider], ["BLEU-4", e.bleu4], ["ROUGE-L", e.rouge]].map(([k, v]) =>
        h("div", {}, h("div", { class: "k" }, k), h("div", { class: "v" }, num(v, 2))))),
    examples.length ? h("h2", {}, "Example predictions") : null,
    examples.map((x) => h("div", { class: "pred" },
      h("div", {}, x.prediction),
      h("div", { class: "ref" }, "reference: " + x.reference + " (sample " + x.sample_id + ")"))));
}

function checkpointsPanel(job, events) {
  const committed = events.filter((e) => e.event && e.event.checkpoint).reverse();
  const items = [];
  if (job.latest_checkpoint) items.push(h("p", {}, "latest: step " + job.latest_checkpoint.step + " ", h("code", {}, job.latest_checkpoint.url)));
  if (job.checkpoint_failure) items.push(h("p", { class: "error" }, "not saved at step " + job.checkpoint_failure.step + ": " + job.checkpoint_failure.reason));
  if (committed.length) {
    items.push(h("table", { id: "checkpoints" }, h("tbody", {}, committed.slice(0, 8).map((e) =>
      h("tr", {}, h("td", {}, "step " + e.event.checkpoint.step), h("td", {}, when(e.unix_ms)))))));
  }
  return items.length ? items : [h("p", { class: "muted" }, "None yet.")];
}

async function cancel(id) {
  if (!confirm("Cancel job " + id + "? Its checkpoints are kept.")) return;
  try {
    await api("jobs/" + encodeURIComponent(id) + "/cancel", { method: "POST", headers: { "x-samtrain-ui": "1" } });
  } catch (err) {
    alert("Cannot cancel: " + err.message);
  }
  refresh();
}

async function jobView(id, seq) {
  const { job, loss, events } = await api("jobs/" + encodeURIComponent(id));
  if (seq !== latest) return;
  document.title = "samtrain: " + job.name + " (" + job.state + ")";
  const pct = job.total_steps ? (100 * job.step) / job.total_steps : 0;
  const facts = [
    ["step", job.step + " / " + job.total_steps, h("div", { class: "bar" }, h("div", { style: null, "data-pct": pct.toFixed(1) }))],
    ["loss", num(job.loss, 4)],
    ["generation", job.generation],
    ["workers", job.world_size ? job.world_size + " of " + job.max_workers + " (dp " + job.dp + " × tp " + job.tp + ")" : "–"],
    ["restarts", job.restarts],
    ["resizes", job.resizes],
    ["created", when(job.created_unix_ms)],
    ["finished", when(job.finished_unix_ms)],
  ];
  const grid = h("div", { class: "grid" }, facts.map(([k, v, extra]) =>
    h("div", {}, h("div", { class: "k" }, k), h("div", { class: "v" }, v), extra || null)));
  // The bar's width goes through the CSSOM: the page's policy forbids
  // inline style attributes.
  const fill = grid.querySelector("[data-pct]");
  if (fill) fill.style.width = pct.toFixed(1) + "%";
  const recent = events.slice().reverse().slice(0, 30).map((e) => {
    const [kind, text] = describeEvent(e);
    return h("tr", {}, h("td", {}, when(e.unix_ms)), h("td", {}, kind), h("td", {}, text));
  });
  show(
    h("div", { class: "panel", id: "job", "data-job": job.id, "data-state": job.state },
      h("h1", {}, job.name, " ", state(job.state)),
      h("p", { class: "muted" }, h("span", { class: "mono" }, job.id), " · ", job.message),
      TERMINAL.has(job.state) ? null : h("p", {}, h("button", { onclick: () => cancel(job.id) }, "Cancel job")),
      grid),
    h("div", { class: "cols" },
      h("div", {},
        h("div", { class: "panel" }, h("h2", {}, "Loss"), lossChart(loss)),
        h("div", { class: "panel" }, h("h2", {}, "Ranks of generation " + job.generation), ranksTable(job))),
      h("div", {},
        h("div", { class: "panel" }, h("h2", {}, "Checkpoints"), checkpointsPanel(job, events)),
        h("div", { class: "panel" }, h("h2", {}, "Evaluation"), evalPanel(job)))),
    h("div", { class: "panel" }, h("h2", {}, "Events"),
      recent.length ? h("table", { class: "events", id: "events" }, h("tbody", {}, recent)) : h("p", { class: "muted" }, "None yet.")),
    h("p", {}, h("a", { href: "#/" }, "← all jobs")));
}

// -------------------------------------------------------------- router ---

async function refresh() {
  clearTimeout(timer);
  const seq = ++latest;
  const m = location.hash.match(/^#\/job\/([A-Za-z0-9_-]+)$/);
  try {
    if (m) await jobView(m[1], seq); else await listView(seq);
    if (seq === latest) setStatus("updated " + new Date().toLocaleTimeString(), false);
  } catch (err) {
    if (seq !== latest) return;
    setStatus(err.message, true);
    if (document.querySelector("#main > .muted")) show(h("p", { class: "error" }, err.message));
  }
  if (seq === latest) timer = setTimeout(refresh, POLL_MS);
}

window.addEventListener("hashchange", refresh);
refresh();
