// Deployed models: GET /models (refreshed every 3 s), and per model an image upload whose top-k comes
// from the model's predict endpoint on Ray Serve, through the dashboard's relay (Serve is another origin).
"use strict";

dg2pf.start(() => {
  const { h, fraction, percent } = dg2pf;
  const list = document.getElementById("models");
  const cards = new Map(); // model id -> {card, status, message, undeploy}: built once, so results stay

  function buildCard(model) {
    const status = h("span", { class: "state model-status" });
    const message = h("p", { class: "note" });
    const facts = h("dl", { class: "summary" });
    const file = h("input", { type: "file", name: "image", accept: "image/png,image/jpeg", class: "image-input" });
    const topK = h("input", { type: "number", name: "top_k", min: 1, max: 1000, value: 5, class: "top-k" });
    const result = h("div", { class: "prediction" });
    const error = h("p", { class: "error", role: "alert", hidden: true });
    const form = h("form", { class: "predict-form" },
      h("label", {}, "image (PNG or JPEG) ", file),
      h("label", {}, "top-k ", topK),
      h("button", { type: "submit" }, "Predict"));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      error.hidden = true;
      if (!file.files.length) {
        error.textContent = "choose an image first";
        error.hidden = false;
        return;
      }
      const image = file.files[0];
      const body = new FormData();
      body.append("image", image, image.name);
      const k = Math.max(1, parseInt(topK.value, 10) || 5);
      result.replaceChildren(h("p", { class: "muted" }, "predicting…"));
      try {
        const answer = await dg2pf.getJson(`/ui/api/models/${model.id}/predict?top_k=${k}`, { method: "POST", body });
        showPrediction(result, image, answer);
      } catch (e) {
        result.replaceChildren();
        error.textContent = e.message;
        error.hidden = false;
      }
    });
    const undeploy = h("button", { type: "button", class: "danger quiet" }, "Undeploy");
    undeploy.addEventListener("click", async () => {
      if (!confirm(`Undeploy model ${model.id}? The job and its artifacts stay.`)) return;
      try {
        await dg2pf.api(`/models/${model.id}`, { method: "DELETE" });
        refresh();
      } catch (e) {
        dg2pf.showError("models-error", e);
      }
    });
    const card = h("section", { class: "panel model", data: { modelId: model.id } },
      h("div", { class: "bar" },
        h("h2", {}, "Model ", h("a", { href: `${dg2pf.root}/ui/jobs/${model.id}`, class: "mono" }, model.id.slice(0, 8))),
        status, h("span", { class: "spacer" }), undeploy),
      facts, message, form, error, result);
    return { card, status, message, facts };
  }

  function showPrediction(result, image, answer) {
    const preview = h("img", { class: "preview", alt: `the uploaded image ${image.name}` });
    const url = URL.createObjectURL(image);
    preview.src = url;
    preview.addEventListener("load", () => URL.revokeObjectURL(url));
    const rows = (answer.predictions[0] || []).map((p, i) => {
      const fill = h("div", { class: "fill" });
      fill.style.width = `${Math.max(0, Math.min(1, p.probability)) * 100}%`;
      return h("tr", { data: { rank: i + 1, label: p.label } },
        h("td", { class: "num" }, String(i + 1)),
        h("td", { class: "label" }, p.label),
        h("td", { class: "meter" }, h("div", { class: "track" }, fill)),
        h("td", { class: "num probability" }, fraction(p.probability)));
    });
    result.replaceChildren(preview, h("div", {},
      h("p", { class: "muted" }, `${image.name}: top ${rows.length}, computed by ${answer.backend || "the model"}`),
      h("table", { class: "grid predictions" },
        h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "class"), h("th", {}, ""), h("th", {}, "probability"))),
        h("tbody", {}, rows))));
  }

  function fact(label, value) {
    return [h("dt", {}, label), h("dd", {}, value === null || value === undefined ? "–" : value)];
  }

  async function refresh() {
    let models;
    try {
      models = await dg2pf.getJson("/models");
      dg2pf.showError("models-error", null);
    } catch (e) {
      dg2pf.showError("models-error", e);
      dg2pf.loadFailed("models-empty", e);
      throw e;
    }
    document.getElementById("serve-url").textContent = `Ray Serve: ${models.serve_url}`;
    const seen = new Set();
    for (const model of models.items) {
      seen.add(model.id);
      if (!cards.has(model.id)) {
        cards.set(model.id, buildCard(model));
        list.append(cards.get(model.id).card);
      }
      const c = cards.get(model.id);
      c.status.textContent = model.status;
      c.status.className = `state model-status ${model.status}`;
      c.card.dataset.status = model.status;
      c.message.textContent = model.message || "";
      c.message.hidden = !model.message;
      c.facts.replaceChildren(...[
        fact("architecture", model.arch),
        fact("input", model.input_shape ? model.input_shape.join(" × ") : null),
        fact("classes", model.num_classes),
        fact("sparsity", model.sparsity === null ? null : fraction(model.sparsity)),
        fact("test top-1", model.test_top1 === null ? null : percent(model.test_top1)),
        fact("backend", model.backend),
        fact("predict URL", h("span", { class: "mono" }, model.url)),
      ].flat());
    }
    for (const [id, c] of cards) {
      if (!seen.has(id)) {
        c.card.remove();
        cards.delete(id);
      }
    }
    dg2pf.loaded("models-empty", models.items.length === 0);
    list.dataset.loaded = "true";
  }

  dg2pf.every(3000, refresh);
});
