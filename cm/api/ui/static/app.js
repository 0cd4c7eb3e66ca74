// cm's web page: the live parts (a sync's progress and rate chart, the cluster's rates). The page reads
// without this script; with it, a running sync is followed through the API's long poll
// (GET /ui/jobs/ID.json?wait=S: answered when the job ends, or after S seconds).
"use strict";

function size(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
}

function duration(s) {
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  const pad = (x) => String(x).padStart(2, "0");
  return h ? h + ":" + pad(m) + ":" + pad(r) : m + ":" + pad(r);
}

function text(id, value) {
  const el = document.getElementById(id);
  if (el) el.textContent = value;
}

function followJob(live) {
  const id = live.dataset.job;
  const times = [], rates = [];
  let plot = null;
  const box = document.getElementById("chart");
  function draw() {
    if (!box || typeof uPlot === "undefined") return;
    if (plot === null) {
      plot = new uPlot({width: Math.max(300, box.clientWidth || 600), height: 200,
                        series: [{}, {label: "rate", stroke: "#2a6fdb", width: 2, value: (u, v) => v == null ? "" : size(v) + "/s"}],
                        axes: [{}, {values: (u, vals) => vals.map((v) => size(v) + "/s"), size: 80}]},
                       [times, rates], box);
    } else {
      plot.setData([times, rates]);
    }
  }
  function show(v) {
    const p = v.progress == null ? 0 : v.progress;
    const bar = document.getElementById("progress");
    if (bar) { bar.value = p; bar.textContent = p + "%"; }
    text("percent", p + "%");
    text("state", v.state);
    text("reason", v.reason);
    if (v.bytes_total != null) text("bytes", size(v.bytes_done) + " of " + size(v.bytes_total));
    if (v.files_total != null) text("files", v.files_done + " of " + v.files_total);
    if (v.rate != null) text("rate", size(v.rate) + "/s");
    text("eta", v.eta == null ? "" : duration(v.eta));
    if (v.rate != null) {
      times.push(v.now); rates.push(v.rate); draw();
      if (box) box.dataset.points = times.length;
    }
  }
  async function poll() {
    for (;;) {
      let v;
      try {
        const answer = await fetch("/ui/jobs/" + id + ".json?wait=1", {credentials: "same-origin", cache: "no-store"});
        if (!answer.ok) { await new Promise((r) => setTimeout(r, 2000)); continue; }
        v = await answer.json();
      } catch (e) {
        await new Promise((r) => setTimeout(r, 2000));
        continue;
      }
      show(v);
      if (v.final) { location.reload(); return; }  // the final page: its report, exit code, history
    }
  }
  if (live.dataset.final !== "1") poll();
}

function followRates(table) {
  const body = table.tBodies[0];
  async function tick() {
    try {
      const answer = await fetch(table.dataset.live, {credentials: "same-origin", cache: "no-store"});
      if (answer.ok) {
        const rates = await answer.json();
        body.replaceChildren();
        const pairs = Object.keys(rates);
        for (const pair of pairs) {
          const row = body.insertRow();
          row.insertCell().textContent = pair;
          const n = row.insertCell(); n.textContent = rates[pair].syncs; n.className = "n";
          const r = row.insertCell(); r.textContent = size(rates[pair].rate) + "/s"; r.className = "n";
        }
        if (!pairs.length) { const c = body.insertRow().insertCell(); c.colSpan = 3; c.textContent = "no sync is running"; }
      }
    } catch (e) { /* the head is away for a moment: try again at the next tick */ }
    setTimeout(tick, 2000);
  }
  setTimeout(tick, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (live) followJob(live);
  const rates = document.getElementById("rates");
  if (rates && rates.dataset.live) followRates(rates);
});
