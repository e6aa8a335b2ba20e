// servelm live metrics: polls this server's Prometheus /metrics once a second and draws the
// last two minutes of load, KV-cache use, throughput and latency. No build step, no library.
"use strict";

const PERIOD_MS = 1000;
const KEEP = 120; // samples on each chart

// Each series reads one number from a scrape (`now`), the scrape before (`before`) and the
// seconds between them; counters become rates, histograms means over the interval.
const CHARTS = [
  { id: "requests", title: "Requests", unit: "", series: [
    { label: "running", color: "#2563eb", read: (now) => sum(now, "servelm:num_requests_running") },
    { label: "waiting", color: "#f59e0b", read: (now) => sum(now, "servelm:num_requests_waiting") },
  ] },
  { id: "kv", title: "KV cache in use", unit: "%", series: [
    { label: "blocks used", color: "#16a34a", read: (now) => 100 * mean(now, "servelm:kv_cache_usage_perc") },
  ] },
  { id: "throughput", title: "Throughput", unit: "tok/s", series: [
    { label: "generated", color: "#7c3aed", read: (now, before, dt) => rate(now, before, dt, "servelm:generation_tokens_total") },
    { label: "prompt", color: "#94a3b8", read: (now, before, dt) => rate(now, before, dt, "servelm:prompt_tokens_total") },
  ] },
  { id: "latency", title: "Latency (mean of requests finished in the interval)", unit: "s", series: [
    { label: "time to first token", color: "#dc2626", read: (now, before) => histogramMean(now, before, "servelm:time_to_first_token_seconds") },
    { label: "end to end", color: "#0891b2", read: (now, before) => histogramMean(now, before, "servelm:e2e_request_latency_seconds") },
  ] },
];

// Prometheus text format -> Map(name -> [values of its label sets]).
function parse(text) {
  const metrics = new Map();
  for (const line of text.split("\n")) {
    const match = /^([a-zA-Z_:][\w:]*)(?:\{.*\})?\s+(\S+)/.exec(line);
    if (!match || line.startsWith("#")) continue;
    const value = Number(match[2]);
    if (!Number.isFinite(value)) continue;
    if (!metrics.has(match[1])) metrics.set(match[1], []);
    metrics.get(match[1]).push(value);
  }
  return metrics;
}

const sum = (m, name) => (m.get(name) || []).reduce((a, b) => a + b, 0);
const mean = (m, name) => (m.get(name) || []).length ? sum(m, name) / m.get(name).length : 0;
const rate = (now, before, dt, name) => before && dt > 0 ? Math.max(0, sum(now, name) - sum(before, name)) / dt : null;

function histogramMean(now, before, name) {
  if (!before) return null;
  const count = sum(now, name + "_count") - sum(before, name + "_count");
  return count > 0 ? (sum(now, name + "_sum") - sum(before, name + "_sum")) / count : null;
}

function makeCard(chart) {
  const card = document.createElement("div");
  card.className = "card";
  card.innerHTML = `<h2></h2><div class="now"></div><canvas></canvas>`;
  card.querySelector("h2").textContent = chart.title + (chart.unit ? ` (${chart.unit})` : "");
  card.querySelector("canvas").id = "chart-" + chart.id;
  chart.now = card.querySelector(".now");
  chart.canvas = card.querySelector("canvas");
  chart.values = chart.series.map(() => []);
  document.getElementById("charts").append(card);
}

function niceMax(value) {
  if (value <= 0) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((k) => k * step).find((v) => v >= value);
}

function format(v) {
  if (v === null) return "–";
  if (Number.isInteger(v) || Math.abs(v) >= 100) return v.toFixed(0);
  return Math.abs(v) >= 1 ? v.toFixed(1) : v.toFixed(3);
}

function draw(chart) {
  const canvas = chart.canvas, ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  const left = 44, right = 8, top = 8, bottom = 18;
  const seen = chart.values.flat().filter((v) => v !== null);
  const max = niceMax(Math.max(0, ...seen));
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#6b7280";
  g.strokeStyle = "#e5e7eb";
  for (let i = 0; i <= 5; i++) {  // five steps: 1, 2, 5 or 10 x 10^k split evenly
    const y = top + (height - top - bottom) * (1 - i / 5);
    g.beginPath(); g.moveTo(left, y); g.lineTo(width - right, y); g.stroke();
    g.fillText(format(max * i / 5), 2, y + 4);
  }
  g.fillText(`last ${KEEP * PERIOD_MS / 1000} s`, left, height - 4);
  const x = (i) => left + (width - left - right) * (i + KEEP - chart.values[0].length) / (KEEP - 1);
  const y = (v) => top + (height - top - bottom) * (1 - v / max);
  chart.series.forEach((series, s) => {
    g.strokeStyle = series.color;
    g.lineWidth = 2;
    g.beginPath();
    let pen = false;
    chart.values[s].forEach((v, i) => {
      if (v === null) { pen = false; return; }
      pen ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v));
      pen = true;
    });
    g.stroke();
  });
  canvas.dataset.samples = String(chart.values[0].length);
  chart.now.textContent = chart.series.map((series, s) =>
    `${series.label} ${format(chart.values[s].at(-1) ?? null)}`).join(" · ");
}

let before = null, beforeTime = 0;

async function poll() {
  try {
    const response = await fetch("/metrics", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const now = parse(await response.text()), time = performance.now();
    const dt = (time - beforeTime) / 1000;
    for (const chart of CHARTS) {
      chart.series.forEach((series, s) => {
        chart.values[s].push(series.read(now, before, dt));
        if (chart.values[s].length > KEEP) chart.values[s].shift();
      });
      draw(chart);
    }
    before = now;
    beforeTime = time;
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
    document.getElementById("status").classList.remove("bad");
  } catch (e) {
    document.getElementById("status").textContent = "cannot read /metrics: " + e.message;
    document.getElementById("status").classList.add("bad");
  }
}

CHARTS.forEach(makeCard);
poll();
setInterval(poll, PERIOD_MS);
window.addEventListener("resize", () => CHARTS.forEach(draw));
