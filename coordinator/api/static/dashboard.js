// The gradpool dashboard: polls /v1/status and redraws. Charts are plain SVG.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let lastStatus = null;
let lastFetch = 0;

function el(name, attrs = {}, text = null, ns = null) {
  const node = ns ? document.createElementNS(ns, name) : document.createElement(name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

const fmt = (x, digits = 3) => (x === null || x === undefined || !isFinite(x) ? "–" : x.toFixed(digits));

// Round numbers for an axis between lo and hi, about `count` of them.
function ticks(lo, hi, count = 4) {
  if (hi <= lo) { hi = lo + 1; }
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(t);
  return out;
}

// series: [{cls, points: [[x, y], ...]}]; yFormat formats the y axis labels.
function lineChart(svg, series, yFormat) {
  svg.replaceChildren();
  const W = 480, H = 220, L = 54, R = 10, T = 10, B = 26;
  const pts = series.flatMap((s) => s.points);
  if (pts.length === 0) {
    svg.append(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet", SVG));
    return;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x1 === x0) { x1 = x0 + 1; }
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 1; y1 += Math.abs(y1) * 0.05 || 1; }
  const pad = (y1 - y0) * 0.05;
  y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (const t of ticks(y0, y1)) {
    svg.append(el("line", { class: "grid", x1: L, x2: W - R, y1: sy(t), y2: sy(t) }, null, SVG));
    svg.append(el("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end" }, yFormat(t), SVG));
  }
  for (const t of ticks(x0, x1, 6).filter((t) => Number.isInteger(t))) {
    svg.append(el("text", { x: sx(t), y: H - 8, "text-anchor": "middle" }, String(t), SVG));
  }
  for (const s of series) {
    if (s.points.length === 0) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    svg.append(el("path", { class: `series ${s.cls}`, d }, null, SVG));
    for (const p of s.points) {
      const dot = el("circle", { class: `pt ${s.cls}`, cx: sx(p[0]), cy: sy(p[1]), r: 2.5 }, null, SVG);
      dot.append(el("title", {}, `${p[0]}: ${yFormat(p[1])}`, SVG));
      svg.append(dot);
    }
  }
}

function row(cells) {
  const tr = el("tr");
  for (const c of cells) {
    const td = el("td");
    if (c instanceof Node) td.append(c); else td.textContent = c;
    tr.append(td);
  }
  return tr;
}

function reasons(counts) {
  const parts = Object.entries(counts || {}).sort((a, b) => b[1] - a[1]).map(([r, n]) => `${r} ×${n}`);
  return parts.join(", ");
}

function drawRound(s) {
  const r = s.round;
  $("round-number").textContent = r.round;
  $("round-version").textContent = r.version;
  $("round-uploads").textContent = `${r.submissions} / ${r.expected}`;
  $("round-status").textContent = r.status;
  $("miners").textContent = s.miners;
  const stall = $("stall");
  stall.hidden = s.stalled_rounds < 3;
  const keys = s.stalled_by.map((k) => k.slice(0, 12)).join(", ") || "nobody";
  stall.textContent = `the held-out loss has not fallen in ${s.stalled_rounds} rounds; their versions were made of the uploads of ${keys}`;
  drawDeadline();
}

// The deadline counts down between polls, from the value the last poll gave.
function drawDeadline() {
  if (!lastStatus) return;
  const left = lastStatus.round.deadline_s;
  $("round-deadline").textContent = left === null ? "waiting for uploads"
    : `${Math.max(0, left - (Date.now() - lastFetch) / 1000).toFixed(0)} s`;
}

function drawCharts(s) {
  const loss = [];
  if (s.initial_eval_loss !== null) loss.push([0, s.initial_eval_loss]);
  const seen = new Set([0]);
  for (const r of s.rounds) {
    if (r.eval_loss !== null && !seen.has(r.version)) { loss.push([r.version, r.eval_loss]); seen.add(r.version); }
  }
  loss.sort((a, b) => a[0] - b[0]);
  lineChart($("loss-chart"), [{ cls: "loss", points: loss }], (y) => y.toFixed(2));
  const last = loss.length ? loss[loss.length - 1][1] : null;
  $("latest-loss").textContent = fmt(last);
  // a log scale: the first round's checkpoints would flatten every later round on a linear one
  const log = (n) => Math.log10(Math.max(1, n));
  lineChart($("bytes-chart"), [
    { cls: "up", points: s.rounds.map((r) => [r.round, log(r.bytes_up)]) },
    { cls: "down", points: s.rounds.map((r) => [r.round, log(r.bytes_down)]) },
  ], (t) => fmtBytes(Math.pow(10, t)));
  // vanishing or exploding gradients at a glance: the norms on a log scale, the clipped fraction beside
  const known = (f) => s.rounds.filter((r) => r[f] !== null && r[f] !== undefined);
  const log10 = (f) => known(f).map((r) => [r.round, Math.log10(Math.max(1e-6, r[f]))]);
  lineChart($("health-chart"), [
    { cls: "gmean", points: log10("grad_norm_mean") },
    { cls: "gmax", points: log10("grad_norm_max") },
  ], (t) => Math.pow(10, t).toPrecision(2));
  lineChart($("clipped-chart"), [
    { cls: "clipped", points: known("clipped_fraction").map((r) => [r.round, r.clipped_fraction]) },
  ], (y) => y.toFixed(2));
}

function drawRounds(s) {
  const body = $("rounds");
  const recent = s.rounds.slice(-20).reverse();
  if (recent.length === 0) return;
  body.replaceChildren(...recent.map((r) => {
    let refused = r.rejected ? `${r.rejected}: ${reasons(r.refusals)}` : "0";
    if (r.close_reason) refused += ` (no version: ${r.close_reason})`;
    const tr = row([r.round, r.version, fmt(r.eval_loss), r.accepted, refused, fmtBytes(r.bytes_up),
      fmtBytes(r.bytes_down), `${r.wall_s.toFixed(1)} s`,
      r.wall_s > 0 ? `${Math.round((100 * Math.min(r.compute_s, r.wall_s)) / r.wall_s)} %` : "–"]);
    if (r.rejected || r.close_reason) tr.cells[4].classList.add("bad");
    return tr;
  }));
}

function drawLeaderboard(s) {
  const body = $("leaderboard");
  if (s.leaderboard.length === 0) return;
  body.replaceChildren(...s.leaderboard.map((m, i) => {
    const name = el("code", { title: m.miner }, m.miner.slice(0, 12));
    // the conservative score ranks; the mean and its standard error say how sure it is
    const score = el("span", { title: `mean ${fmt(m.score_mean)} ± ${fmt(m.score_stderr)} (one standard error)` },
      `${fmt(m.score)} (${fmt(m.score_mean, 2)} ± ${fmt(m.score_stderr, 2)})`);
    let refused = m.rounds_refused ? `${m.rounds_refused}: ${reasons(m.refusals)}` : "0";
    // accepted uploads that their evaluation, once the version was out, would have refused
    if (Object.keys(m.flagged || {}).length) refused += `; flagged ${reasons(m.flagged)}`;
    const rounds = m.rounds_missed ? `${m.rounds_contributed} (${m.rounds_missed} missed)` : m.rounds_contributed;
    return row([i + 1, name, score, fmt(m.gain_avg, 4), rounds, refused]);
  }));
}

// an evaluation shared among validators: each one's record (GET /v1/validators)
async function drawValidators(s) {
  $("validators-section").hidden = !s.run.evaluation.assign;
  if (!s.run.evaluation.assign) return;
  const response = await fetch("/v1/validators", { cache: "no-store" });
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  const records = (await response.json()).validators;
  if (records.length === 0) return;
  $("validators").replaceChildren(...records.map((v) => {
    const tr = row([el("code", { title: v.validator }, v.validator.slice(0, 12)), v.assigned, v.agreed,
      v.outvoted, v.missed, v.last_round ?? "–", v.benched ? "no: benched" : "yes"]);
    if (v.outvoted) tr.cells[3].classList.add("bad");
    if (v.missed) tr.cells[4].classList.add("bad");
    return tr;
  }));
}

function drawConfig(s) {
  const run = s.run, a = run.architecture, c = run.codec, rec = run.recipe;
  const items = [
    ["run", run.run_id],
    ["model", `${run.model}: ${a.family}, ${a.n_layer} layers, width ${a.n_embd}, ${a.n_head} heads`],
    ["sequences", `${run.num_sequences} of ${run.seq_len} tokens, every ${run.eval_every}th held out`],
    ["codec", c.name === "sparseloco" ? `sparseloco, top ${c.k} of ${c.tile}×${c.tile}` : c.name],
    ["recipe", `${rec.inner_steps} inner steps × ${rec.batch_size} sequences, lr ${rec.lr}`],
    ["upload cap", fmtBytes(run.max_payload_bytes)],
    ["tokenizer", run.tokenizer_sha256.slice(0, 16)],
  ];
  $("config").replaceChildren(...items.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  $("run-id").textContent = `· run ${run.run_id} · ${run.model}`;
}

async function poll() {
  try {
    const response = await fetch("/v1/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const s = await response.json();
    lastStatus = s;
    lastFetch = Date.now();
    drawRound(s);
    drawCharts(s);
    drawRounds(s);
    drawLeaderboard(s);
    drawConfig(s);
    await drawValidators(s);
    $("connection").textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    $("connection").classList.remove("bad");
  } catch (e) {
    $("connection").textContent = `cannot reach the coordinator (${e.message}); retrying`;
    $("connection").classList.add("bad");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

setInterval(drawDeadline, 1000);
poll();
