// edgefleet dashboard: pages routed by the URL's hash, drawn from the controller's JSON API with
// the operator token the operator logs in with. Every value reaches the page as text (textContent,
// SVG attributes), never as markup. Each page is redrawn from fresh data on a timer.
"use strict";

const TOKEN_KEY = "edgefleet.token";
const POLL_MS = 2000;
const MAX_ROWS = 200;  // table rows drawn; the API has them all
const session = { who: null, timer: null, page: 0, reason: "" };

// --- DOM -------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  el.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setAttrs(el, attrs);
  el.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

function table(headers, rows, total) {
  const body = rows.slice(0, MAX_ROWS).map((cells) => h("tr", null, cells.map((c) => h("td", null, c))));
  const more = (total ?? rows.length) > MAX_ROWS ? h("p", { class: "muted" }, `showing ${MAX_ROWS} of ${total ?? rows.length}`) : null;
  return [h("table", null, h("thead", null, h("tr", null, headers.map((x) => h("th", null, x)))), h("tbody", null, body)), more];
}

function badge(text) {
  return h("span", { class: `badge b-${String(text).toLowerCase()}` }, text);
}

function bar(done, total, failed = 0) {
  const width = (n) => `${total ? Math.round((100 * n) / total) : 0}%`;
  const el = h("span", { class: "bar", title: `${done}/${total}` }, h("span", { class: "ok" }), h("span", { class: "bad" }));
  el.children[0].style.width = width(done - failed);  // CSSOM, allowed by the page's style-src 'self'
  el.children[1].style.width = width(failed);
  return el;
}

function link(href, text) {
  return h("a", { href }, text);
}

function when(iso) {
  if (!iso) return "—";
  const seconds = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (seconds < 60) return `${Math.max(0, seconds)}s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ago`;
  return new Date(iso).toLocaleString();
}

function num(value, digits = 3) {
  return value === null || value === undefined ? "—" : Number(value).toPrecision(digits).replace(/\.?0+$/, "");
}

function percent(share) {
  return `${Math.round(share * 1000) / 10}%`;
}

function modelText(m) {
  return m ? `${m.model} ${m.version} ${m.variant}` : "nothing";
}

// every model a device serves (the API's `active` list)
function servingText(models) {
  return models.length ? models.map(modelText).join(", ") : "nothing";
}

// --- the API -----------------------------------------------------------------------------

class LoggedOut extends Error {}

async function api(path, method = "GET") {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(path, { method, headers: { Authorization: `Bearer ${token}` } });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    logout(body.error || "the token was refused");
    throw new LoggedOut();
  }
  if (!response.ok) throw new Error(body.error || `${method} ${path}: ${response.status}`);
  return body;
}

function logout(reason) {
  sessionStorage.removeItem(TOKEN_KEY);
  session.who = null;
  session.reason = reason;
  route();
}

// --- charts (hand-drawn SVG) ---------------------------------------------------------------

const W = 560, H = 220, PAD = { l: 48, r: 16, t: 24, b: 34 };

function ticks(lo, hi, n = 4) {
  const step = (hi - lo) / n || 1;
  return Array.from({ length: n + 1 }, (_, i) => lo + i * step);
}

function span(values, fromZero, pad) {
  let [lo, hi] = [Math.min(...values), Math.max(...values)];
  if (fromZero) lo = Math.min(0, lo);
  if (lo === hi) [lo, hi] = [lo - 1, hi + 1];
  const margin = (hi - lo) * pad;
  return [fromZero && lo === 0 ? 0 : lo - margin, hi + margin];
}

// Axes and scales for points (xs, ys); a line chart's y starts at zero, a scatter's fits its points.
function frame(xs, ys, xLabel, yLabel, { xFmt = num, fromZero = true, pad = 0 } = {}) {
  const [x0, x1] = span(xs, false, pad);
  const [y0, y1] = span(ys, fromZero, pad);
  const px = (x) => PAD.l + ((x - x0) / (x1 - x0)) * (W - PAD.l - PAD.r);
  const py = (y) => H - PAD.b - ((y - y0) / (y1 - y0)) * (H - PAD.t - PAD.b);
  const xs5 = ticks(x0, x1);
  const axes = s("g", { class: "axes" },
    ticks(y0, y1).map((y) => [s("line", { x1: PAD.l, x2: W - PAD.r, y1: py(y), y2: py(y), class: "grid" }),
      s("text", { x: PAD.l - 6, y: py(y) + 4, "text-anchor": "end" }, num(y, 4))]),
    xs5.map((x, i) => s("text", { x: px(x), y: H - PAD.b + 16, "text-anchor": i === xs5.length - 1 ? "end" : "middle" }, xFmt(x))),
    s("text", { x: W - PAD.r, y: H - 2, "text-anchor": "end", class: "label" }, xLabel),
    s("text", { x: 4, y: 12, class: "label" }, yLabel));
  return { px, py, axes };
}

function lineChart(series, xLabel, yLabel) {
  const all = series.flatMap((line) => line.points);
  if (!all.length) return h("p", { class: "muted" }, "no data yet");
  const f = frame(all.map((p) => p[0]), all.map((p) => p[1]), xLabel, yLabel,
    { xFmt: (t) => new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" }) });
  const lines = series.map((line, i) => s("g", { class: `c${i}` },
    s("polyline", { class: "line", points: line.points.map(([x, y]) => `${f.px(x)},${f.py(y)}`).join(" ") }),
    line.points.map(([x, y]) => s("circle", { cx: f.px(x), cy: f.py(y), r: 2 }))));
  return figure(s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart" }, f.axes, lines), series.map((l) => l.name));
}

function scatterChart(groups, xLabel, yLabel) {
  const all = groups.flatMap((g) => g.points);
  if (!all.length) return h("p", { class: "muted" }, "no device has measured a variant with an accuracy yet");
  const f = frame(all.map((p) => p.x), all.map((p) => p.y), xLabel, yLabel, { fromZero: false, pad: 0.12 });
  const placed = [];  // label positions so far: a label that would overlap one is left to the tooltip
  const label = (x, y, text) => {
    if (placed.some(([px, py]) => Math.abs(px - x) < 90 && Math.abs(py - y) < 12)) return null;
    placed.push([x, y]);
    const left = x > W - 150;  // near the right edge: the label goes to the left of its mark
    return s("text", { x: left ? x - 8 : x + 8, y: y - 6, "text-anchor": left ? "end" : "start" }, text);
  };
  const marks = groups.map((g, i) => {
    const front = g.points.filter((p) => p.frontier).sort((a, b) => a.x - b.x);
    return s("g", { class: `c${i}` },
      front.length > 1 ? s("polyline", { class: "line dashed", points: front.map((p) => `${f.px(p.x)},${f.py(p.y)}`).join(" ") }) : null,
      g.points.map((p) => s("g", { class: "mark" },
        s("circle", { cx: f.px(p.x), cy: f.py(p.y), r: p.frontier ? 6 : 4, class: p.frontier ? "front" : "" },
          s("title", null, p.title)),
        label(f.px(p.x), f.py(p.y), p.label))));
  });
  return figure(s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart" }, f.axes, marks), groups.map((g) => g.name));
}

function barChart(labels, values, yLabel) {
  const top = Math.max(1, ...values);
  const width = (W - PAD.l - PAD.r) / values.length;
  const py = (v) => H - PAD.b - (v / top) * (H - PAD.t - PAD.b);
  return s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart" },
    s("text", { x: 4, y: 12, class: "label" }, `${yLabel} (tallest bar ${top})`),
    values.map((v, i) => s("g", { class: "c0" },
      s("rect", { x: PAD.l + i * width + 1, y: py(v), width: Math.max(1, width - 2), height: H - PAD.b - py(v) },
        s("title", null, `${labels[i]}: ${v}`)),
      s("text", { x: PAD.l + (i + 0.5) * width, y: H - PAD.b + 14, "text-anchor": "middle" }, labels[i]))));
}

function figure(svg, names) {
  return h("figure", null, svg, h("figcaption", null, names.map((name, i) => h("span", { class: `key c${i}` }, name))));
}

// --- pages -------------------------------------------------------------------------------

async function fleetPage() {
  const [fleet, devices] = await Promise.all([api("/v1/fleet"), api("/v1/devices")]);
  const classes = fleet.classes.map((c) => h("div", { class: "card" },
    h("h3", null, c.hardware_class),
    h("p", { class: "big" }, `${c.devices} device${c.devices === 1 ? "" : "s"}`),
    h("p", null, h("span", { class: "dot on" }), ` ${c.online} online  `, h("span", { class: "dot off" }),
      ` ${c.devices - c.online} offline`),
    h("ul", null, Object.entries(c.serving).map(([what, n]) => h("li", null, `${what} × ${n}`)))));
  return h("section", null,
    h("h1", null, "Fleet"),
    h("p", { id: "fleet-summary" }, `${fleet.devices} devices, ${fleet.online} online, in ${fleet.classes.length} hardware classes`),
    h("div", { class: "cards" }, classes),
    h("h2", null, "Devices"),
    table(["device", "class", "online", "serving", "labels", "last seen"], devices.map((d) => [
      link(`#/devices/${encodeURIComponent(d.id)}`, d.id), d.hardware_class || "—",
      h("span", { class: `dot ${d.online ? "on" : "off"}`, title: d.online ? "online" : "offline" }),
      servingText(d.active), Object.entries(d.labels).map(([k, v]) => `${k}=${v}`).join(" "), when(d.last_seen),
    ])));
}

async function rolloutsPage() {
  const rollouts = await api("/v1/rollouts?limit=100");
  return h("section", null, h("h1", null, "Rollouts"),
    rollouts.length ? table(["rollout", "model", "state", "stage", "devices", "created"], rollouts.map((r) => [
      link(`#/rollouts/${encodeURIComponent(r.id)}`, r.id), `${r.model} ${r.version}`, badge(r.state),
      `${r.stage + 1}/${r.stages.length}`, [bar(r.succeeded + r.failed, r.devices, r.failed),
        ` ${r.succeeded} ok, ${r.failed} failed of ${r.devices}`], `${when(r.created_at)} by ${r.created_by}`,
    ])) : h("p", { class: "muted" }, "No rollouts yet: `fleetctl deploy MODEL:VERSION --to SELECTOR`."));
}

async function rolloutPage(id) {
  const [r, live] = await Promise.all([api(`/v1/rollouts/${id}`), api(`/v1/rollouts/${id}/live`)]);
  return h("section", null,
    h("h1", null, r.id, " ", badge(r.state)),
    h("p", null, `${r.model} ${r.version} to `, h("code", null, r.selector || "every device"),
      ` · stages ${r.stages.map(percent).join(" → ")} · bake ${live.bake_s}s`),
    h("p", { id: "rollout-detail", class: "detail" }, r.detail),
    controls(r, live),
    h("p", { id: "bake" }, bakeText(r, live)),
    h("h2", null, "Stages"),
    h("div", { class: "stages" }, r.progress.map((stage) => stageCard(r, stage))),
    h("h2", null, `Gates of stage ${live.stage + 1}`),
    live.gates.length ? table(["class", "gate", "value", "threshold", "verdict"], live.gates.map((g) => [
      g.hardware_class || "all", g.gate, g.value === null ? (g.awaiting ? `waiting: ${g.awaiting}` : "no data") : num(g.value),
      num(g.threshold), badge(g.verdict),
    ])) : h("p", { class: "muted" }, noGates(r)),
    r.gates.length ? [h("h2", null, "Verdicts"), table(["stage", "class", "gate", "value", "threshold", "verdict", "at"],
      r.gates.map((g) => [g.stage + 1, g.hardware_class || "all", g.gate, num(g.value), num(g.threshold), badge(g.verdict), when(g.ts)]))] : null,
    h("div", { class: "columns" },
      h("div", null, h("h2", null, "Timeline"), h("ol", { class: "timeline" }, live.timeline.map((e) =>
        h("li", { class: `t-${e.kind}` }, h("time", null, new Date(e.ts).toLocaleTimeString()), " ", e.text)))),
      h("div", null, h("h2", null, "Devices"), table(["device", "stage", "variant", "state", "detail"],
        r.executions.map((e) => [link(`#/devices/${encodeURIComponent(e.device)}`, e.device), e.stage + 1,
          e.variant || "—", badge(e.state), e.detail])))));
}

function noGates(r) {
  if (["PENDING", "RUNNING", "PAUSED"].includes(r.state)) return "No devices in this stage yet.";
  if (r.gates.length) return "The rollout is over: its stages' verdicts are below.";
  return "The rollout is over; no stage was judged by its gates (promoted by hand, or stopped first).";
}

function bakeText(r, live) {
  if (r.bake) return `Stage ${live.stage + 1} baking: ${Math.ceil(r.bake.left_s)}s left of ${r.bake.seconds}s.`;
  if (r.state === "PAUSED") return `Stage ${live.stage + 1} is paused: resume it to go on.`;
  if (r.state !== "RUNNING") return "";
  const stage = r.progress[live.stage];
  const pending = stage ? Object.values(stage.classes).reduce((n, c) => n + c.total - c.done, 0) : 0;
  return pending ? `Stage ${live.stage + 1}: ${pending} device(s) updating; the bake starts when all have finished.`
    : `Stage ${live.stage + 1}: ${r.detail}`;
}

function stageCard(r, stage) {
  const where = stage.stage < r.stage ? "done" : stage.stage === r.stage ? "current" : "next";
  const classes = Object.entries(stage.classes);
  return h("div", { class: `card stage ${where}` },
    h("h3", null, `Stage ${stage.stage + 1} · ${percent(stage.share)}`),
    classes.length ? classes.map(([cls, c]) => h("div", { class: "cls" },
      h("span", { class: "name" }, cls), bar(c.done, c.total, failures(c.states)), ` ${c.done}/${c.total}`,
      h("div", { class: "muted small" }, Object.entries(c.states).map(([st, n]) => `${st} ${n}`).join(" · "))))
      : h("p", { class: "muted" }, where === "next" ? "not started" : "no devices"));
}

const FAILED = new Set(["FAILED", "ROLLED_BACK", "REJECTED", "TIMED_OUT"]);

function failures(states) {
  return Object.entries(states).reduce((n, [st, count]) => n + (FAILED.has(st) ? count : 0), 0);
}

function controls(r, live) {
  if (!session.who.controls) return h("p", { class: "muted" }, `Your role (${session.who.role}) can watch; a deployer can steer.`);
  const box = h("div", { class: "controls" });
  const message = h("span", { class: "error" });
  for (const action of ["pause", "resume", "promote", "abort", "rollback"]) {
    box.append(h("button", {
      "data-action": action, disabled: !live.controls.includes(action),
      onclick: async (event) => {
        if (["abort", "rollback"].includes(action) && !window.confirm(`${action} ${r.id}?`)) return;
        event.target.disabled = true;
        try {
          await api(`/v1/rollouts/${encodeURIComponent(r.id)}/${action}`, "POST");
          route();
        } catch (e) {
          if (!(e instanceof LoggedOut)) message.textContent = e.message;
        }
      },
    }, action));
  }
  box.append(message);
  return box;
}

async function devicePage(id) {
  const [d, events, trends] = await Promise.all([api(`/v1/devices/${id}`), api(`/v1/devices/${id}/events?limit=30`),
    api(`/v1/devices/${id}/trends`)]);
  const t = trends.traffic.map((p) => ({ ...p, x: new Date(p.ts).getTime() }));
  return h("section", null,
    h("h1", null, d.id, " ", h("span", { class: `dot ${d.online ? "on" : "off"}` }), d.online ? " online" : " offline"),
    h("p", null, `${d.hardware_class || "unknown class"} · serving ${servingText(d.active)} · last seen ${when(d.last_seen)}`),
    h("p", { class: "muted" }, Object.entries(d.labels).map(([k, v]) => `${k}=${v}`).join(" ")),
    h("div", { class: "columns" },
      h("div", null, h("h2", null, "Latency (ms)"), lineChart([
        { name: "p50", points: t.filter((p) => p.p50_ms !== null).map((p) => [p.x, p.p50_ms]) },
        { name: "p99", points: t.filter((p) => p.p99_ms !== null).map((p) => [p.x, p.p99_ms]) }], "time", "ms")),
      h("div", null, h("h2", null, "Requests and errors"), lineChart([
        { name: "requests", points: t.map((p) => [p.x, p.requests]) },
        { name: "errors", points: t.map((p) => [p.x, p.errors]) }], "time", "per report"))),
    h("div", { class: "columns" },
      h("div", null, h("h2", null, "Model history"), table(["at", "event", "model"], trends.history.map((e) =>
        [when(e.ts), badge(e.state), modelText(e)]))),
      h("div", null, h("h2", null, "Benchmarks on this device"), table(["at", "model", "p50 ms", "p99 ms", "replaced p99 ms"],
        trends.benchmarks.map((b) => [when(b.ts), modelText(b), num(b.p50_ms), num(b.p99_ms), num(b.baseline_p99_ms)])))),
    h("h2", null, "Recent events"),
    table(["at", "rollout", "state", "model", "detail"], events.slice().reverse().map((e) =>
      [when(e.ts), e.deployment ? link(`#/rollouts/${encodeURIComponent(e.deployment)}`, e.deployment) : "—", badge(e.state),
        e.model ? `${e.model} ${e.version} ${e.variant || ""}` : "—", e.detail])));
}

async function modelsPage() {
  const models = await api("/v1/models");
  return h("section", null, h("h1", null, "Models"), table(["model", "latest", "versions", "variants", "published"],
    models.map((m) => [link(`#/models/${encodeURIComponent(m.model)}`, m.model), m.latest, m.versions.join(", "),
      m.variants.join(", "), when(m.published_at)])));
}

const FRONTIER_VERSIONS = 3;  // charts drawn: the newest versions

// The one place the model page reads its measurements: per hardware class, each variant's accuracy
// against its p99 latency on that class (median of its devices' activation benchmarks).
async function frontierOf(name, version) {
  const found = await api(`/v1/models/${name}/${encodeURIComponent(version)}/frontier`);
  return Object.entries(found.classes).map(([cls, points]) => ({
    name: cls,
    points: points.filter((p) => p.p99_ms !== null && p.accuracy !== null).map((p) => ({
      x: p.p99_ms, y: p.accuracy * 100, frontier: p.on_frontier, label: p.variant + (p.picked ? " (picked)" : ""),
      title: `${p.variant} on ${cls}: p99 ${num(p.p99_ms)} ms, ${p.metric} ${num(p.accuracy * 100, 4)}% ` +
        `(median of ${p.devices} device(s))${p.picked ? ", the planner's pick" : ""}`,
    })),
  })).filter((group) => group.points.length);
}

async function modelPage(name) {
  const model = await api(`/v1/models/${name}`);
  const newest = model.versions.slice(0, FRONTIER_VERSIONS);
  const charts = await Promise.all(newest.map((v) => frontierOf(name, v.version)));
  return h("section", null, h("h1", null, model.model),
    h("p", { class: "muted" }, "Each variant's accuracy (the build's evaluation) against its p99 latency on the devices " +
      "of each hardware class. Large marks, joined by a dashed line, are a class's frontier: no other variant there " +
      "is both as fast and as accurate."),
    model.versions.map((v, i) => [h("h2", null, `${v.version} (release ${v.release}, ${when(v.published_at)})`),
      i < charts.length ? scatterChart(charts[i], "p99 latency on devices (ms)", "accuracy %") : null,
      table(["variant", "preference", "size", "build p99 ms", "accuracy", "requirements"], v.variants.map((x) => [
        x.variant, x.preference, x.size_bytes === null ? "—" : `${Math.round(x.size_bytes / 1024)} KiB`, num(x.p99_ms),
        x.accuracy.top1 === undefined || x.accuracy.top1 === null ? "—" : `${num(x.accuracy.top1 * 100, 4)}%`,
        JSON.stringify(x.requirements)]))]));
}

async function dataPage() {
  const stats = await api("/v1/data/stats?max_shards=200");
  return h("section", null, h("h1", null, "Sampled data"),
    h("p", { id: "data-summary" }, `${stats.shards_total} shard(s) uploaded; the newest ${stats.shards_read} read` +
      (stats.unreadable ? `, ${stats.unreadable} unreadable` : "")),
    stats.groups.length ? h("div", { class: "cards" }, stats.groups.map((g) => h("div", { class: "card wide" },
      h("h3", null, `${g.model} ${g.version} on ${g.hardware_class}`),
      h("p", null, `${g.samples} samples in ${g.shards} shard(s), ${g.low_confidence} below the confidence threshold`),
      h("h4", null, "top-1 confidence"),
      barChart(g.confidence_bins.slice(1).map((b) => num(b, 2)), g.confidence_histogram, "samples"),
      h("h4", null, "predicted class"),
      barChart(Object.keys(g.class_histogram), Object.values(g.class_histogram), "samples"))))
      : h("p", { class: "muted" }, "No samples yet: a rollout with --sample-rate makes devices send some."));
}
dataPage.poll = 10000;  // reads shards from the store: not every two seconds

function loginPage() {
  const input = h("input", { type: "password", id: "token", placeholder: "efo_…", autocomplete: "off", size: 48 });
  const error = h("p", { class: "error", id: "login-error" }, session.reason || "");
  const form = h("form", {
    onsubmit: async (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      session.reason = "";
      route();
    },
  }, h("label", { for: "token" }, "Operator token"), input, h("button", { type: "submit" }, "Log in"), error);
  document.getElementById("who").textContent = "";
  document.getElementById("main").replaceChildren(h("section", { class: "login" }, h("h1", null, "Log in"),
    h("p", null, "Use an operator token: HOME/operator-token, or one from `fleetctl tokens create NAME --role viewer`."),
    form));
  input.focus();
}

// --- routing -------------------------------------------------------------------------------

const ROUTES = [
  [/^#\/fleet$/, fleetPage], [/^#\/rollouts$/, rolloutsPage], [/^#\/rollouts\/([^/]+)$/, rolloutPage],
  [/^#\/devices\/([^/]+)$/, devicePage], [/^#\/models$/, modelsPage], [/^#\/models\/([^/]+)$/, modelPage],
  [/^#\/data$/, dataPage],
];

async function route() {
  clearTimeout(session.timer);
  const page = ++session.page;
  if (!sessionStorage.getItem(TOKEN_KEY)) return loginPage();
  try {
    session.who ||= await api("/v1/whoami");
  } catch (e) {
    if (!(e instanceof LoggedOut)) showStatus(e.message, true);
    return;
  }
  const who = document.getElementById("who");
  who.replaceChildren(`${session.who.name} (${session.who.role}) `,
    h("button", { class: "link", onclick: () => logout("") }, "log out"));
  const found = ROUTES.map(([pattern, draw]) => [location.hash.match(pattern), draw]).find(([m]) => m);
  if (!found) {
    location.hash = "#/fleet";
    return;
  }
  const [match, draw] = found;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("here", location.hash.startsWith(a.getAttribute("href")));
  let drawn = false;
  const redraw = async () => {
    try {
      const node = await draw(...match.slice(1));
      if (page !== session.page) return;
      document.getElementById("main").replaceChildren(node);
      drawn = true;
      showStatus(`updated ${new Date().toLocaleTimeString()}`, false);
    } catch (e) {
      if (e instanceof LoggedOut || page !== session.page) return;
      if (!drawn) document.getElementById("main").replaceChildren(h("p", { class: "error" }, e.message));
      showStatus(e.message, true);
    }
    if (page === session.page) session.timer = setTimeout(redraw, draw.poll || POLL_MS);
  };
  await redraw();
}

function showStatus(text, failed) {
  const footer = document.getElementById("status");
  footer.textContent = text;
  footer.classList.toggle("error", failed);
}

window.addEventListener("hashchange", route);
route();
