// A job's page: GET /jobs/{id} every 1.5 s while it is queued or running, drawn as the curves of
// dg2pf_core/io/plots.py's training.png (same phases, same colours) with uPlot; once it has finished, its
// results (MACs, parameters and measured speed-ups, as `dg2pf status` prints them) and per-layer
// sparsity from metrics.json. Cancel and deploy call the API; artifacts download with the token.
"use strict";

dg2pf.start(() => {
  const { h, fraction, percent, duration, when, num, TERMINAL } = dg2pf;
  const jobId = document.body.dataset.jobId;
  const POLL_MS = 1500;
  const PHASES = {
    baseline: ["baseline (unpruned)", "#9e9e9e"],
    gradual_pruning: ["gradual pruning", "#f28e2b"],
    distillation: ["distillation", "#4e79a7"],
    finetuning: ["pruned fine-tuning", "#59a14f"],
  };
  const phaseStyle = (phase) => PHASES[phase] || [phase, "#bab0ac"]; // a phase this page does not know: as recorded
  // One chart per figure of job.html: the history key it plots, its scale, and its look.
  const CHARTS = {
    top1: { key: "val_top1", scale: 1, color: "#1f4e79", label: "validation top-1 (%)" },
    sparsity: { key: "sparsity", scale: 100, color: "#b07aa1", label: "sparsity (%)", range: [0, 100] },
    loss: { key: "train_loss", scale: 1, color: "#e15759", label: "training loss" },
    recovered: { key: "recovered", scale: 1, color: "#76b7b2", label: "weights recovered", bars: true, fromZero: true },
  };

  let spans = []; // [phase, first epoch, last epoch] of each run of records in one phase
  let kept = null; // the epoch whose weights the job kept (its best), once known
  const charts = {};
  let job = null;
  let finished = false;

  // --- charts ---------------------------------------------------------------------------------

  // Phases shaded behind each chart and the kept epoch as a dashed line, as on training.png.
  const backdrop = {
    hooks: {
      drawClear: [(u) => {
        const { left, top, width, height } = u.bbox;
        const ctx = u.ctx;
        ctx.save();
        ctx.globalAlpha = 0.16;
        for (const [phase, first, last] of spans) {
          const x0 = Math.max(left, u.valToPos(first - 0.5, "x", true));
          const x1 = Math.min(left + width, u.valToPos(last + 0.5, "x", true));
          if (x1 <= x0) continue;
          ctx.fillStyle = phaseStyle(phase)[1];
          ctx.fillRect(x0, top, x1 - x0, height);
        }
        ctx.restore();
      }],
      draw: [(u) => {
        if (kept === null) return;
        const x = u.valToPos(kept, "x", true);
        const ctx = u.ctx;
        ctx.save();
        ctx.strokeStyle = "#000";
        ctx.lineWidth = Math.max(1, devicePixelRatio);
        ctx.setLineDash([5 * devicePixelRatio, 4 * devicePixelRatio]);
        ctx.beginPath();
        ctx.moveTo(x, u.bbox.top);
        ctx.lineTo(x, u.bbox.top + u.bbox.height);
        ctx.stroke();
        ctx.restore();
      }],
    },
  };

  function chartWidth(fig) {
    return Math.max(280, fig.clientWidth - 8);
  }

  function makeChart(name) {
    const c = CHARTS[name];
    const fig = document.getElementById(`chart-${name}`);
    const series = { label: c.label, stroke: c.color, width: 2, points: { show: true, size: 6, fill: c.color } };
    if (c.bars) Object.assign(series, { fill: c.color, paths: uPlot.paths.bars({ size: [0.6, 48] }), points: { show: false } });
    const yRange = c.range ? () => c.range
      : (u, min, max) => {
        if (min === null || max === null) return [0, 1];
        const lo = c.fromZero ? 0 : min;
        const pad = (max - lo) * 0.08 || Math.abs(max) * 0.05 || 1;
        return [c.fromZero ? 0 : lo - pad, max + pad];
      };
    return new uPlot({
      width: chartWidth(fig),
      height: 190,
      legend: { show: true, live: true },
      cursor: { drag: { x: false, y: false } },
      scales: {
        x: { time: false, range: (u, min, max) => [(min ?? 0) - 0.5, (max ?? 0) + 0.5] },
        y: { range: yRange },
      },
      axes: [
        { label: "epoch", labelSize: 18, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], grid: { stroke: "#eee" } },
        { size: 56, grid: { stroke: "#eee" } },
      ],
      series: [{ label: "epoch" }, series],
      plugins: [backdrop],
    }, [[], []], fig);
  }

  function phaseSpans(records) {
    const out = [];
    for (const r of records) {
      const last = out[out.length - 1];
      if (last && last[0] === r.phase) last[2] = r.epoch;
      else out.push([r.phase, r.epoch, r.epoch]);
    }
    return out;
  }

  function keptEpoch(records) {
    const best = job.best_metrics || {};
    if (Number.isInteger(best.best_epoch)) return best.best_epoch;
    const marked = records.filter((r) => r.is_best === true);
    return marked.length ? marked[marked.length - 1].epoch : null;
  }

  function drawCharts() {
    const records = dg2pf.epochRecords(job.history);
    spans = phaseSpans(records);
    kept = keptEpoch(records);
    const xs = records.map((r) => r.epoch);
    for (const [name, c] of Object.entries(CHARTS)) {
      const fig = document.getElementById(`chart-${name}`);
      const ys = records.map((r) => (num(r[c.key]) === null ? null : r[c.key] * c.scale));
      const shown = xs.filter((x, i) => ys[i] !== null);
      // Weights recovered exist in pruning epochs only: no such epoch yet, no chart.
      fig.hidden = name === "recovered" && shown.length === 0;
      if (xs.length && !fig.hidden) {
        charts[name] = charts[name] || makeChart(name);
        charts[name].setData([xs, ys]);
      }
      if (name === "recovered") {
        const total = ys.reduce((sum, y) => sum + (y || 0), 0);
        document.getElementById("recovered-total").textContent = shown.length ? ` · ${total.toLocaleString()} in all` : "";
      }
      fig.dataset.points = String(shown.length);
      fig.dataset.lastEpoch = shown.length ? String(shown[shown.length - 1]) : "";
    }
    dg2pf.loaded("charts-empty", xs.length === 0);
    const legend = spans.map(([phase]) => phase).filter((p, i, all) => all.indexOf(p) === i).map((phase) => {
      const swatch = h("span", { class: "swatch" });
      swatch.style.background = phaseStyle(phase)[1];
      return h("li", { data: { phase } }, swatch, phaseStyle(phase)[0]);
    });
    if (kept !== null) legend.push(h("li", { class: "kept" }, h("span", { class: "swatch dashed" }), `kept (best) epoch ${kept}`));
    document.getElementById("phase-legend").replaceChildren(...legend);
  }

  window.addEventListener("resize", () => {
    for (const [name, chart] of Object.entries(charts)) {
      chart.setSize({ width: chartWidth(document.getElementById(`chart-${name}`)), height: 190 });
    }
  });

  // --- the rest of the page -------------------------------------------------------------------

  function term(label, value) {
    return [h("dt", {}, label), h("dd", {}, value)];
  }

  function drawSummary() {
    const title = job.name === null || job.name === undefined ? `Job ${job.id}` : job.name;
    document.getElementById("job-name").textContent = title;
    document.title = `${title} · dg2pf`;
    const state = document.getElementById("job-state");
    state.textContent = job.state;
    state.className = `state ${job.state}`;
    const max = job.spec.schedule ? job.spec.schedule.max_epochs : null;
    const best = job.best_metrics || {};
    const latest = job.latest_metrics || {};
    const target = job.target_sparsity ? fraction(job.target_sparsity) : "MACs target";
    const items = [
      term("id", h("span", { class: "mono" }, job.id)),
      term("phase", job.phase.replace("_", " ")),
      term("epoch", max && !TERMINAL.has(job.state) ? `${job.epoch} of ≤ ${max}` : String(job.epoch)),
      term("sparsity", `${fraction(job.current_sparsity)} → ${target}`),
      term("validation top-1", percent(latest.val_top1)),
    ];
    if (num(best.test_top1) !== null) {
      const base = num(best.baseline_test_top1) !== null ? `${percent(best.baseline_test_top1)} → ` : "";
      items.push(term("test top-1 (unpruned → pruned)", `${base}${percent(best.test_top1)}`));
    }
    items.push(term("submitted", when(job.created_at)));
    items.push(term(TERMINAL.has(job.state) ? "ran" : "running for", job.started_at ? duration(dg2pf.jobSeconds(job)) : "–"));
    if (!TERMINAL.has(job.state) && num(job.eta_seconds) !== null) items.push(term("time left", `~${duration(job.eta_seconds)}`));
    if (job.restarts) items.push(term("restarts", String(job.restarts)));
    document.getElementById("summary").replaceChildren(...items.flat());

    const failure = document.getElementById("failure");
    failure.hidden = !job.error && !(job.restart_log || []).length;
    document.getElementById("failure-type").textContent = job.error ? job.error.type : "";
    document.getElementById("failure-message").textContent = job.error ? job.error.message : "";
    document.getElementById("restart-log").replaceChildren(...(job.restart_log || []).map(
      (r) => h("li", {}, `restarted at epoch ${r.epoch} (${when(r.at)}): ${r.reason}`)));
    const spec = document.getElementById("spec");
    spec.textContent = JSON.stringify(job.spec, null, 2);
    spec.className = "";
    document.getElementById("cancel").disabled = TERMINAL.has(job.state);
  }

  async function download(name) {
    const r = await dg2pf.api(`/jobs/${jobId}/artifacts/${encodeURIComponent(name)}`);
    const url = URL.createObjectURL(await r.blob());
    const a = h("a", { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  function size(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 ** 2) return `${(bytes / 1024).toFixed(1)} KiB`;
    if (bytes < 1024 ** 3) return `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
    return `${(bytes / 1024 ** 3).toFixed(2)} GiB`;
  }

  async function drawArtifacts() {
    let list;
    try {
      list = await dg2pf.getJson(`/jobs/${jobId}/artifacts`);
    } catch (e) {
      dg2pf.loadFailed("artifacts-empty", e);
      throw e;
    }
    const rows = list.artifacts.map((a) => h("tr", { data: { artifact: a.name } },
      h("td", { class: "mono" }, a.name),
      h("td", { class: "num" }, size(a.bytes)),
      h("td", {}, h("button", {
        type: "button", class: "quiet",
        onclick: () => download(a.name).catch((e) => dg2pf.showError("job-error", e)),
      }, "Download"))));
    document.querySelector("#artifacts tbody").replaceChildren(...rows);
    dg2pf.loaded("artifacts-empty", rows.length === 0);
  }

  // A finished job's metrics.json; without one (a failed or cancelled job), the status's summary of it, if any.
  async function finalMetrics() {
    try {
      return await (await dg2pf.api(`/jobs/${jobId}/artifacts/metrics.json`)).json();
    } catch (e) {
      return job.best_metrics;
    }
  }

  const count = (x) => x.toLocaleString();
  const times = (x, digits) => `${x.toFixed(digits)}×`;

  // Per backend, the measured speed-up of the pruned model over the dense one at each batch size: with
  // the two medians from metrics.json, or the speed-ups alone from the status's summary.
  function speedUps(latency) {
    const out = [];
    const rows = latency.backends
      || Object.fromEntries(Object.entries(latency.speedup || {}).map(([b, byBatch]) => [b,
        Object.fromEntries(Object.entries(byBatch).map(([n, x]) => [n, { speedup: x }]))]));
    for (const [backend, byBatch] of Object.entries(rows)) {
      const int8 = (r) => (num(r.int8_ms) !== null && num(r.int8_speedup) !== null
        ? `, int8 ${r.int8_ms.toFixed(2)} ms (${times(r.int8_speedup, 2)})` : "");
      const cells = Object.entries(byBatch).filter(([, r]) => num(r.speedup) !== null).map(([n, r]) => (
        num(r.dense_ms) !== null && num(r.pruned_ms) !== null
          ? `batch ${n}: ${r.dense_ms.toFixed(2)} → ${r.pruned_ms.toFixed(2)} ms (${times(r.speedup, 2)})${int8(r)}`
          : `batch ${n}: ${times(r.speedup, 2)}`));
      if (cells.length) out.push([backend, cells]);
    }
    return out;
  }

  function drawResults(m) {
    const items = [];
    const result = (label, metric, value, data = {}) => [h("dt", {}, label), h("dd", { data: { metric, ...data } }, value)];
    if (m && num(m.flops_sparse) !== null && num(m.flops_dense)) {
      items.push(result("MACs, pruned / dense", "macs",
        `${count(m.flops_sparse)} / ${count(m.flops_dense)} (${times(m.flops_sparse / m.flops_dense, 3)})`));
    }
    if (m && m.granularity === "channel" && num(m.params_total) !== null && num(m.params_dense)) {
      items.push(result("parameters, pruned model / dense", "params",
        `${count(m.params_total)} / ${count(m.params_dense)} (${times(m.params_total / m.params_dense, 3)})`));
    } else if (m && num(m.params_nonzero) !== null && num(m.params_total)) {
      items.push(result("parameters, nonzero / total", "params",
        `${count(m.params_nonzero)} / ${count(m.params_total)} (${times(m.params_nonzero / m.params_total, 3)})`));
    }
    const latency = (m && m.latency) || {};
    const speeds = speedUps(latency);
    for (const [backend, cells] of speeds) {
      items.push(result(`measured speed-up, ${backend}`, "speedup", cells.join(" · "), { backend }));
    }
    if (items.length && !speeds.length) {
      items.push(result("measured speed-up", "speedup", latency.reason ? `not measured: ${latency.reason}` : "not measured"));
    }
    const q = m && m.quantization;
    if (q) {  // precision int8: whether model.int8.onnx was kept, with its figures, or why not
      const pct = (x) => (num(x) !== null ? `${x.toFixed(2)}%` : "–");
      items.push(result("int8 model", "int8", q.written
        ? `kept (${q.method || "?"} calibration): val top-1 ${pct(q.val_top1_int8)} vs fp32 ${pct(q.val_top1_fp32)}`
          + (num(q.max_drop) !== null ? ` (drop allowed ${q.max_drop})` : "")
          + (num(q.test_top1_int8) !== null ? `, test top-1 ${pct(q.test_top1_int8)}` : "")
          + (num(q.bytes_fp32) !== null && num(q.bytes_int8) !== null ? `; ${size(q.bytes_fp32)} → ${size(q.bytes_int8)}` : "")
        : `not kept: ${q.reason || "no reason given"}`, { written: q.written ? "yes" : "no" }));
    }
    document.getElementById("results").replaceChildren(...items.flat());
    document.getElementById("results-note").textContent = speeds.length && num(latency.threads) !== null
      ? `· latency on ${latency.threads} thread${latency.threads === 1 ? "" : "s"}${latency.cpu ? ` of ${latency.cpu}` : ""}; `
        + "speed-up = dense / pruned median" : "";
    document.getElementById("results-empty").dataset.empty = "None: the job ended without results.";
    dg2pf.loaded("results-empty", items.length === 0);
  }

  // A max_top1_drop search (metrics.json's objective): every trial's measured latency against its
  // validation top-1, the floor it had to keep, and the chosen one, as pareto.png draws them.
  function drawFront(metrics) {
    const o = metrics && metrics.objective;
    if (!o || !Array.isArray(o.points)) return;
    const pts = o.points.filter((p) => num(p.measured_ms) !== null && num(p.val_top1) !== null);
    document.getElementById("front-note").textContent =
      `· ${o.backend}, ${o.threads} thread${o.threads === 1 ? "" : "s"}, batch ${o.batch_size}; ${o.reason}`;
    const rows = o.points.map((p) => h("tr", { data: { trial: p.trial_id, chosen: p.chosen ? "yes" : "no" } },
      h("td", { class: "num" }, p.budget_ms.toFixed(3)),
      h("td", { class: "num" }, num(p.measured_ms) !== null ? p.measured_ms.toFixed(3) : p.status),
      h("td", { class: "num" }, num(p.val_top1) !== null ? `${p.val_top1.toFixed(2)}%` : "–"),
      h("td", {}, p.within_drop === true ? "yes" : p.within_drop === false ? "no" : "–"),
      h("td", { class: "num" }, num(p.int8_measured_ms) !== null
        ? `${p.int8_measured_ms.toFixed(3)} ms, ${p.int8_val_top1.toFixed(2)}%${p.int8_within_drop ? "" : " (under)"}` : "–"),
      h("td", {}, p.chosen ? `chosen${p.chosen_precision ? ` (${p.chosen_precision})` : ""}` : "")));
    document.querySelector("#front tbody").replaceChildren(...rows);
    const svg = document.getElementById("front-plot");
    const NS = "http://www.w3.org/2000/svg";
    const el = (name, attrs, text) => {
      const e = document.createElementNS(NS, name);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      if (text !== undefined) e.textContent = text;
      return e;
    };
    const q8 = o.points.filter((p) => num(p.int8_measured_ms) !== null && num(p.int8_val_top1) !== null);
    const xs = [...pts.map((p) => p.measured_ms), ...q8.map((p) => p.int8_measured_ms), o.dense_measured_ms];
    const ys = [...pts.map((p) => p.val_top1), ...q8.map((p) => p.int8_val_top1), o.floor_val_top1, o.baseline_val_top1];
    const [x0, x1] = [0, Math.max(...xs) * 1.05];
    const [y0, y1] = [Math.min(...ys) - 1, Math.max(...ys) + 1];
    const X = (x) => 50 + ((x - x0) / (x1 - x0 || 1)) * 570;
    const Y = (y) => 230 - ((y - y0) / (y1 - y0 || 1)) * 210;
    const parts = [
      el("line", { x1: 50, y1: 230, x2: 620, y2: 230, class: "axis" }),
      el("line", { x1: 50, y1: 20, x2: 50, y2: 230, class: "axis" }),
      el("text", { x: 335, y: 255, "text-anchor": "middle" }, "measured latency (ms)"),
      el("text", { x: 12, y: 125, transform: "rotate(-90 12 125)", "text-anchor": "middle" }, "val top-1 (%)"),
      el("line", { x1: 50, x2: 620, y1: Y(o.floor_val_top1), y2: Y(o.floor_val_top1), class: "floor" }),
      el("text", { x: 616, y: Y(o.floor_val_top1) - 4, "text-anchor": "end" }, `floor ${o.floor_val_top1.toFixed(2)}%`),
      el("line", { y1: 20, y2: 230, x1: X(o.dense_measured_ms), x2: X(o.dense_measured_ms), class: "dense" }),
      el("text", { x: X(o.dense_measured_ms) - 4, y: 32, "text-anchor": "end" }, `dense ${o.dense_measured_ms.toFixed(3)} ms`),
      el("text", { x: 50, y: 245, "text-anchor": "middle" }, "0"),
      el("text", { x: 620, y: 245, "text-anchor": "end" }, x1.toFixed(3)),
      el("text", { x: 46, y: 24, "text-anchor": "end" }, y1.toFixed(1)),
      el("text", { x: 46, y: 230, "text-anchor": "end" }, y0.toFixed(1)),
    ];
    const picked = (p, precision) => p.chosen && (p.chosen_precision || "fp32") === precision;
    for (const p of pts) {
      const dot = el("circle", { cx: X(p.measured_ms), cy: Y(p.val_top1), r: picked(p, "fp32") ? 7 : 5,
        class: picked(p, "fp32") ? "point chosen" : "point", "data-trial": p.trial_id });
      dot.append(el("title", {}, `${p.trial_id}: ${p.measured_ms.toFixed(3)} ms, ${p.val_top1.toFixed(2)}%`));
      parts.push(dot);
    }
    for (const p of q8) {  // precision int8: each trial's int8 model, a square
      const side = picked(p, "int8") ? 12 : 9;
      const dot = el("rect", { x: X(p.int8_measured_ms) - side / 2, y: Y(p.int8_val_top1) - side / 2, width: side,
        height: side, class: picked(p, "int8") ? "point int8 chosen" : "point int8", "data-trial": p.trial_id });
      dot.append(el("title", {}, `${p.trial_id} int8: ${p.int8_measured_ms.toFixed(3)} ms, ${p.int8_val_top1.toFixed(2)}%`));
      parts.push(dot);
    }
    svg.replaceChildren(...parts);
    document.getElementById("front-panel").hidden = false;
  }

  function drawLayers(metrics) {
    const layers = metrics && metrics.layer_sparsity;
    if (!layers || !Object.keys(layers).length) return;
    const target = num(metrics.target_sparsity);
    document.getElementById("layers-note").textContent = [
      target !== null ? `target ${fraction(target)}` : null,
      num(metrics.layer_cap) !== null ? `cap per layer ${fraction(metrics.layer_cap)}` : null,
      num(metrics.sparsity_prunable) !== null ? `reached ${fraction(metrics.sparsity_prunable)} overall` : null,
    ].filter(Boolean).join(" · ");
    const rows = Object.entries(layers).map(([name, value]) => {
      const fill = h("div", { class: "fill" });
      fill.style.width = `${Math.max(0, Math.min(1, value)) * 100}%`;
      const track = h("div", { class: "track" }, fill);
      if (target !== null) {
        const mark = h("div", { class: "target", title: `target ${fraction(target)}` });
        mark.style.left = `${target * 100}%`;
        track.append(mark);
      }
      return h("tr", { data: { layer: name } }, h("td", { class: "mono layer", title: name }, name), h("td", { class: "meter" }, track),
        h("td", { class: "num" }, fraction(value)));
    });
    document.querySelector("#layers tbody").replaceChildren(...rows);
    document.getElementById("layers-panel").hidden = false;
  }

  async function drawDeployment() {
    const deploy = document.getElementById("deploy");
    if (job.state !== "succeeded") {
      deploy.disabled = true;
      return;
    }
    try {
      const model = await dg2pf.getJson(`/models/${jobId}`);
      deploy.disabled = true;
      note(`Deployed on Ray Serve (${model.status}): `, "the Models page", "/ui/models");
    } catch (e) {
      if (!(e instanceof dg2pf.ApiError && e.status === 404)) throw e;
      deploy.disabled = false;
    }
  }

  function note(text, linkText, href) {
    const el = document.getElementById("action-message");
    el.replaceChildren(text, linkText ? h("a", { href: `${dg2pf.root}${href}` }, linkText) : "");
    el.hidden = false;
  }

  async function refresh() {
    try {
      job = await dg2pf.getJson(`/jobs/${jobId}`);
      dg2pf.showError("job-error", null);
    } catch (e) {
      dg2pf.showError("job-error", e);
      // Before its first answer, the page says it has none (not that the job has no epochs or artifacts).
      for (const id of ["charts-empty", "artifacts-empty", "results-empty"]) dg2pf.loadFailed(id, e);
      if (job === null) document.getElementById("spec").textContent = `Not loaded: ${e.message}`;
      if (e instanceof dg2pf.ApiError && e.status === 404) return false;
      throw e;
    }
    drawSummary();
    drawCharts();
    if (!TERMINAL.has(job.state)) {
      document.getElementById("results-empty").dataset.empty = "Measured once the job has finished: MACs, parameters "
        + "and speed-ups.";
      dg2pf.loaded("results-empty", true);
    }
    await drawArtifacts();
    if (!TERMINAL.has(job.state)) return true;
    if (!finished) {
      finished = true;
      const drawn = finalMetrics().then((metrics) => {
        drawResults(metrics);
        drawFront(metrics);
        drawLayers(metrics);
      });
      await Promise.all([drawn, drawDeployment()]);
    }
    document.body.dataset.finished = "true";
    return false;
  }

  // The job on the service now: a page left open on a cancelled job shows it without a reload.
  dg2pf.every(POLL_MS, refresh);

  document.getElementById("cancel").addEventListener("click", async () => {
    const name = job && job.name ? job.name : jobId;
    if (!confirm(`Cancel job ${name}? Its work so far is kept; it cannot be resumed.`)) return;
    try {
      job = await dg2pf.getJson(`/jobs/${jobId}/cancel`, { method: "POST" });
      drawSummary();
      note(`Job ${job.state}.`);
    } catch (e) {
      dg2pf.showError("job-error", e);
    }
  });

  document.getElementById("deploy").addEventListener("click", async () => {
    const button = document.getElementById("deploy");
    button.disabled = true;
    try {
      const model = await dg2pf.getJson(`/jobs/${jobId}/deploy`, { method: "POST" });
      note(`Deploying on Ray Serve (${model.status}); predict from `, "the Models page", "/ui/models");
    } catch (e) {
      button.disabled = false;
      dg2pf.showError("job-error", e);
    }
  });
});
