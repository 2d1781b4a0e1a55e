// The operations view: figures of the whole service (every process), from /metrics each second.

import { NextwordClient, histogramQuantile, parsePrometheus } from "./nextword.js";

const WINDOW_S = 10; // rates, quantiles and batch sizes are over this many seconds
const SPARK_POINTS = 60;
const $ = (id) => document.getElementById(id);
const client = new NextwordClient(location.origin);

let history = []; // snapshots of the last WINDOW_S seconds, oldest first
const rates = []; // requests/s between consecutive snapshots, for the sparkline

/** The figures of one scrape: counters and cumulative histogram buckets, summed over labels. */
function snapshot(samples) {
  const snap = { t: performance.now(), requests: 0, steps: 0, sessions: 0, connections: 0, queue: 0, restarts: 0, latency: new Map(), batch: new Map(), batchSum: 0, batchCount: 0 };
  const add = (map, le, value) => map.set(Number(le), (map.get(Number(le)) ?? 0) + value);
  for (const { name, labels, value } of samples) {
    const api = labels.route === undefined || labels.route.startsWith("/v1/");
    if (name === "nextword_http_requests_total" && api) snap.requests += value;
    else if (name === "nextword_ws_messages_total" && labels.type !== "ready") snap.requests += value;
    else if (name === "nextword_steps_total" && labels.outcome === "ok") snap.steps += value;
    else if (name === "nextword_active_sessions") snap.sessions += value;
    else if (name === "nextword_ws_connections") snap.connections += value;
    else if (name === "nextword_queue_depth") snap.queue += value;
    else if (name === "nextword_engine_restarts_total") snap.restarts += value;
    else if (name === "nextword_batch_size_sum") snap.batchSum += value;
    else if (name === "nextword_batch_size_count") snap.batchCount += value;
    else if (name === "nextword_batch_size_bucket") add(snap.batch, labels.le, value);
    else if (name === "nextword_ws_message_duration_seconds_bucket") add(snap.latency, labels.le, value);
    else if (name === "nextword_http_request_duration_seconds_bucket" && api) add(snap.latency, labels.le, value);
  }
  return snap;
}

function bucketDelta(now, then) {
  return [...now].map(([le, count]) => [le, count - (then.get(le) ?? 0)]);
}

function formatRate(value) {
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}

function formatSeconds(seconds) {
  if (seconds === null) return "–";
  const ms = 1000 * seconds;
  return `${ms < 10 ? ms.toFixed(2) : ms.toFixed(1)} <span class="unit">ms</span>`;
}

function show(now, then) {
  const dt = (now.t - then.t) / 1000;
  const requests = now.requests - then.requests;
  $("requests-rate").textContent = dt > 0 ? formatRate(requests / dt) : "–";
  $("steps-rate").textContent = dt > 0 ? formatRate((now.steps - then.steps) / dt) : "–";
  const latency = bucketDelta(now.latency, then.latency);
  $("latency-p50").innerHTML = formatSeconds(histogramQuantile(0.5, latency));
  $("latency-p99").innerHTML = formatSeconds(histogramQuantile(0.99, latency));
  const batches = now.batchCount - then.batchCount;
  $("batch-mean").textContent = batches > 0 ? ((now.batchSum - then.batchSum) / batches).toFixed(1) : "–";
  $("active-sessions").textContent = String(now.sessions);
  $("ws-connections").textContent = String(now.connections);
  $("queue-depth").textContent = String(now.queue);
  $("engine-restarts").textContent = String(now.restarts); // since the service started
  $("window").textContent = dt > 0 ? dt.toFixed(0) : String(WINDOW_S);
  showBatches(bucketDelta(now.batch, then.batch));
  showSpark();
  $("updated").textContent = `Updated ${new Date().toLocaleTimeString("en-GB")}.`;
}

/** Batches per size range in the window, as bars (buckets are cumulative: take differences). */
function showBatches(cumulative) {
  const rows = [];
  let lower = 0;
  let below = 0;
  for (const [le, count] of cumulative.sort((a, b) => a[0] - b[0])) {
    const label = le === Infinity ? `>${lower}` : le === lower + 1 ? String(le) : `${lower + 1}–${le}`;
    rows.push({ label, count: count - below });
    lower = le;
    below = count;
  }
  const shown = rows.filter((row) => row.count > 0);
  const top = Math.max(1, ...shown.map((row) => row.count));
  const cells = shown.flatMap(({ label, count }) => {
    const name = document.createElement("span");
    name.textContent = label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.setProperty("--share", String(count / top));
    const value = document.createElement("span");
    value.className = "count";
    value.textContent = String(count);
    return [name, bar, value];
  });
  if (!cells.length) {
    const none = document.createElement("span");
    none.className = "note";
    none.textContent = "No batch in the window.";
    cells.push(none);
  }
  $("batches").replaceChildren(...cells);
}

function showSpark() {
  const top = Math.max(1, ...rates);
  const points = rates.map((rate, i) => `${i + SPARK_POINTS - rates.length},${100 - (95 * rate) / top}`);
  $("spark").querySelector("polyline").setAttribute("points", points.join(" "));
}

function showConnection(state, text) {
  $("connection").dataset.state = state;
  $("connection").textContent = text;
}

async function refresh() {
  try {
    const now = snapshot(parsePrometheus(await client.metrics()));
    const last = history[history.length - 1];
    if (last && now.requests < last.requests) history = []; // counters restarted: the service did
    if (last && history.length) {
      rates.push(Math.max(0, (now.requests - last.requests) / ((now.t - last.t) / 1000)));
      if (rates.length > SPARK_POINTS) rates.shift();
    }
    history.push(now);
    while (history.length > 1 && now.t - history[0].t > WINDOW_S * 1000 + 500) history.shift();
    show(now, history[0]);
    showConnection("open", "Live: reading /metrics every second");
  } catch {
    showConnection("reconnecting", "Server unreachable: retrying every second…");
  } finally {
    setTimeout(refresh, 1000);
  }
}

refresh();
