// The jobs table: GET /jobs (filtered by state, 50 a page), refreshed every 2 s while the box is ticked.
"use strict";

dg2pf.start(() => {
  const { h, fraction, percent, duration, when, jobSeconds, TERMINAL } = dg2pf;
  const PAGE = 50;
  const params = new URLSearchParams(location.search);
  const filter = document.getElementById("state-filter");
  const auto = document.getElementById("auto-refresh");
  const body = document.querySelector("#jobs tbody");
  let offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
  filter.value = params.get("state") || "";

  function progress(job) {
    const max = job.spec && job.spec.schedule ? job.spec.schedule.max_epochs : null;
    const done = job.state === "succeeded";
    const value = done ? 1 : max ? Math.min(job.epoch / max, 1) : 0;
    // max_epochs bounds the run; patience may end it sooner, so the count reads "of at most".
    const text = done ? `${job.epoch} epochs` : max ? `epoch ${job.epoch} of ≤ ${max}` : `epoch ${job.epoch}`;
    const eta = !TERMINAL.has(job.state) && dg2pf.num(job.eta_seconds) !== null ? ` · ~${duration(job.eta_seconds)} left` : "";
    return [h("progress", { max: 1, value }), h("span", { class: "muted" }, ` ${text}${eta}`)];
  }

  function testTop1(job) {
    const best = job.best_metrics || {};
    if (dg2pf.num(best.test_top1) !== null) return percent(best.test_top1);
    const latest = job.latest_metrics || {};
    return dg2pf.num(latest.val_top1) !== null ? h("span", { class: "muted", title: "validation top-1 so far" }, `val ${percent(latest.val_top1)}`) : "–";
  }

  function row(job) {
    const link = `${dg2pf.root}/ui/jobs/${job.id}`;
    const target = job.target_sparsity ? fraction(job.target_sparsity, 0) : "MACs target";
    return h("tr", { data: { jobId: job.id, state: job.state } },
      h("td", {}, h("a", { href: link, class: "mono" }, job.id.slice(0, 8))),
      h("td", { class: "name" }, job.name === null || job.name === undefined ? h("span", { class: "muted" }, "–") : job.name),
      h("td", {}, h("span", { class: `state ${job.state}` }, job.state)),
      h("td", { class: "phase" }, job.phase.replace("_", " ")),
      h("td", { class: "progress" }, progress(job)),
      h("td", {}, `${fraction(job.current_sparsity)} → ${target}`),
      h("td", { class: "top1" }, testTop1(job)),
      h("td", {}, duration(jobSeconds(job))),
      h("td", { class: "muted" }, when(job.created_at)));
  }

  let generation = 0; // a refresh started before the filter changed must not draw over the new one

  async function refresh() {
    const mine = generation;
    const query = new URLSearchParams({ limit: PAGE, offset });
    if (filter.value) query.set("state", filter.value);
    try {
      const list = await dg2pf.getJson(`/jobs?${query}`);
      if (mine !== generation) return false;
      body.replaceChildren(...list.items.map(row));
      dg2pf.loaded("jobs-empty", list.items.length === 0);
      const shown = list.items.length ? `${offset + 1}-${offset + list.items.length} of ${list.total}` : `${list.total}`;
      document.getElementById("jobs-total").textContent = `${shown} job${list.total === 1 ? "" : "s"}`;
      document.getElementById("prev").disabled = offset === 0;
      document.getElementById("next").disabled = offset + list.items.length >= list.total;
      dg2pf.showError("jobs-error", null);
      document.getElementById("jobs").dataset.loaded = "true";
    } catch (e) {
      if (mine !== generation) return false;
      dg2pf.showError("jobs-error", e);
      dg2pf.loadFailed("jobs-empty", e);
      throw e;
    }
    return auto.checked;
  }

  let loop = dg2pf.every(2000, refresh);

  function reload() {
    const query = new URLSearchParams();
    if (filter.value) query.set("state", filter.value);
    if (offset) query.set("offset", offset);
    history.replaceState(null, "", `${location.pathname}${query.toString() ? `?${query}` : ""}`);
    loop.stop();
    generation += 1;
    // Another filter or page: its rows are on their way, the old ones would pass for them.
    body.replaceChildren();
    document.getElementById("jobs-total").textContent = "";
    dg2pf.loading("jobs-empty");
    loop = dg2pf.every(2000, refresh);
  }

  filter.addEventListener("change", () => { offset = 0; reload(); });
  auto.addEventListener("change", () => { if (auto.checked) reload(); });
  document.getElementById("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); reload(); });
  document.getElementById("next").addEventListener("click", () => { offset += PAGE; reload(); });
});
