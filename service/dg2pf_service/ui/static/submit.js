// The submit form, built from the JobSpec schema in the service's OpenAPI (GET /openapi.json): one
// field per property, nested objects as fieldsets. Empty fields are left out (the service's defaults
// apply); the service validates everything, and its 4xx answer's `field` puts the message beside that
// field (or the nearest enclosing one). ?from=JOB_ID fills the form with that job's spec.
"use strict";

dg2pf.start(async () => {
  const { h } = dg2pf;
  const form = document.getElementById("job-form");
  const fieldsRoot = document.getElementById("fields");
  const errorSlots = new Map(); // dotted path -> {wrap, slot}: where the service's refusal of that path goes
  const inputs = []; // {path, kind, el, default}
  let components = {};

  // --- schema ---------------------------------------------------------------------------------

  function lookup(ref) {
    return components[ref.split("/").pop()];
  }

  // The schema of a property with $ref and `X | None` (anyOf [X, null]) unwrapped; the property's own
  // title, description and default win over the referenced type's.
  function resolve(schema) {
    let inner = schema;
    let nullable = false;
    if (inner.$ref) inner = lookup(inner.$ref);
    if (inner.anyOf) {
      const types = inner.anyOf.filter((s) => s.type !== "null");
      nullable = types.length < inner.anyOf.length;
      if (types.length === 1) inner = resolve(types[0]).schema;
    }
    const merged = { ...inner };
    for (const key of ["title", "description", "default"]) if (key in schema) merged[key] = schema[key];
    return { schema: merged, nullable };
  }

  function kindOf(s) {
    if (s.enum) return "enum";
    if (s.type === "object" && s.properties) return "object";
    if (s.type === "object" || s.anyOf) return "json";
    if (s.type === "array") return "lines";
    if (["boolean", "integer", "number"].includes(s.type)) return s.type;
    return "string";
  }

  function bounds(s) {
    const parts = [];
    if ("minimum" in s) parts.push(`≥ ${s.minimum}`);
    if ("exclusiveMinimum" in s) parts.push(`> ${s.exclusiveMinimum}`);
    if ("maximum" in s) parts.push(`≤ ${s.maximum}`);
    if ("exclusiveMaximum" in s) parts.push(`< ${s.exclusiveMaximum}`);
    return parts.join(", ");
  }

  function slotFor(path, wrap) {
    const slot = h("p", { class: "field-error", role: "alert", hidden: true });
    errorSlots.set(path, { wrap, slot });
    return slot;
  }

  function field(name, path, schema, required) {
    const { schema: s } = resolve(schema);
    const kind = kindOf(s);
    const id = `f-${path}`;
    if (kind === "object") {
      const set = h("fieldset", { class: "group", data: { field: path } }, h("legend", {}, name));
      if (s.description) set.append(h("p", { class: "help" }, s.description));
      set.append(slotFor(path, set));
      const needed = new Set(s.required || []);
      for (const [child, childSchema] of Object.entries(s.properties)) {
        set.append(field(child, `${path}.${child}`, childSchema, needed.has(child)));
      }
      return set;
    }
    const hasDefault = "default" in s && s.default !== null;
    const shownDefault = hasDefault ? JSON.stringify(s.default) : null;
    let el;
    if (kind === "enum") {
      el = h("select", { id, name: path },
        h("option", { value: "" }, required ? "choose…" : `default (${s.default ?? "none"})`),
        s.enum.map((v) => h("option", { value: v }, v)));
    } else if (kind === "boolean") {
      el = h("input", { id, name: path, type: "checkbox" });
      el.checked = s.default === true;
    } else if (kind === "lines" || kind === "json") {
      el = h("textarea", { id, name: path, rows: 2, placeholder: kind === "lines" ? "one per line" : "JSON object" });
    } else {
      // Text even for numbers: what the user typed reaches the service, which says what is wrong with it.
      const numeric = kind === "integer" || kind === "number";
      el = h("input", { id, name: path, type: "text", inputmode: numeric ? "decimal" : null, autocomplete: "off",
                        placeholder: hasDefault && !Array.isArray(s.default) ? String(s.default) : null });
    }
    inputs.push({ path, kind, el, default: s.default });
    const help = [s.description, bounds(s), hasDefault && kind !== "enum" ? `default ${shownDefault}` : null].filter(Boolean).join(" · ");
    const wrap = h("div", { class: `field ${kind}`, data: { field: path } });
    wrap.append(h("label", { for: id }, name, required ? h("span", { class: "required", title: "required" }, " *") : null), el);
    if (help) wrap.append(h("p", { class: "help" }, help));
    wrap.append(slotFor(path, wrap));
    if (path === "model.checkpoint" || path === "teacher") wrap.append(uploader(el, errorSlots.get(path).slot));
    return wrap;
  }

  // A weights file sent to POST /checkpoints; its id goes into the field.
  function uploader(target, slot) {
    const file = h("input", { type: "file", class: "checkpoint-file", accept: ".safetensors,.pt,.pth,.bin" });
    const status = h("span", { class: "muted" });
    const button = h("button", { type: "button", class: "quiet" }, "Upload");
    button.addEventListener("click", async () => {
      slot.hidden = true;
      if (!file.files.length) return;
      const body = new FormData();
      body.append("file", file.files[0], file.files[0].name);
      status.textContent = "uploading…";
      try {
        const ckpt = await dg2pf.getJson("/checkpoints", { method: "POST", body });
        target.value = ckpt.id;
        status.textContent = `uploaded: ${ckpt.bytes.toLocaleString()} bytes, id ${ckpt.id}`;
      } catch (e) {
        status.textContent = "";
        slot.textContent = e.message;
        slot.hidden = false;
      }
    });
    return h("div", { class: "upload" }, file, button, status);
  }

  // --- values ---------------------------------------------------------------------------------

  function read({ kind, el, default: fallback }) {
    if (kind === "boolean") return el.checked === (fallback === true) ? undefined : el.checked;
    const text = el.value;
    if (text.trim() === "") return undefined;
    if (kind === "integer" || kind === "number") {
      const n = Number(text.trim());
      return Number.isFinite(n) ? n : text;
    }
    if (kind === "lines") return text.split("\n").filter((line) => line.trim() !== "");
    if (kind === "json") {
      try {
        return JSON.parse(text);
      } catch (e) {
        throw new dg2pf.ApiError(0, { type: "invalid_json", field: null, message: `not valid JSON: ${e.message}` });
      }
    }
    return text;
  }

  function collect() {
    const spec = {};
    let bad = null;
    for (const input of inputs) {
      let value;
      try {
        value = read(input);
      } catch (e) {
        bad = bad || { field: input.path, message: e.message };
        continue;
      }
      if (value === undefined) continue;
      const keys = input.path.split(".");
      let node = spec;
      for (const key of keys.slice(0, -1)) node = node[key] = node[key] || {};
      node[keys[keys.length - 1]] = value;
    }
    return { spec, bad };
  }

  function fill(spec) {
    for (const input of inputs) {
      const value = input.path.split(".").reduce((node, key) => (node && typeof node === "object" ? node[key] : undefined), spec);
      if (value === undefined || value === null) continue;
      if (input.kind === "boolean") input.el.checked = value === true;
      else if (input.kind === "lines") input.el.value = value.join("\n");
      else if (input.kind === "json") input.el.value = JSON.stringify(value);
      else input.el.value = String(value);
    }
  }

  // --- errors ---------------------------------------------------------------------------------

  function clearErrors() {
    for (const { wrap, slot } of errorSlots.values()) {
      slot.hidden = true;
      slot.textContent = "";
      wrap.classList.remove("invalid");
    }
    dg2pf.showError("submit-error", null);
  }

  // The message beside the field the service named ("schedule.max_epochs"), or beside the nearest
  // enclosing one ("tune.search_space.lr" -> tune.search_space), else above the form.
  function showFieldError(field, message) {
    const keys = field ? field.split(".") : [];
    while (keys.length && !errorSlots.has(keys.join("."))) keys.pop();
    const target = keys.length ? errorSlots.get(keys.join(".")) : null;
    if (!target) {
      dg2pf.showError("submit-error", { message });
      return;
    }
    target.slot.textContent = message;
    target.slot.hidden = false;
    target.wrap.classList.add("invalid");
    target.wrap.scrollIntoView({ block: "center" });
    const control = target.wrap.querySelector("input, select, textarea");
    if (control) control.focus({ preventScroll: true });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const { spec, bad } = collect();
    if (bad) {
      showFieldError(bad.field, bad.message);
      return;
    }
    const button = document.getElementById("submit");
    button.disabled = true;
    try {
      const submitted = await dg2pf.getJson("/jobs", { method: "POST", json: spec });
      location.assign(`${dg2pf.root}/ui/jobs/${submitted.id}`);
    } catch (e) {
      button.disabled = false;
      if (e.status === 401 || e.status === 403) return;
      showFieldError(e.field, e.message);
    }
  });

  // --- build ----------------------------------------------------------------------------------

  try {
    const openapi = await dg2pf.getJson("/openapi.json");
    components = openapi.components.schemas;
    const body = openapi.paths["/jobs"].post.requestBody.content["application/json"].schema;
    const spec = resolve(body).schema;
    const needed = new Set(spec.required || []);
    for (const [name, schema] of Object.entries(spec.properties)) fieldsRoot.append(field(name, name, schema, needed.has(name)));
    dg2pf.loaded("fields-loading", false);
    document.getElementById("submit").disabled = false;
    const from = new URLSearchParams(location.search).get("from");
    if (from && /^[0-9a-f]{32}$/.test(from)) fill((await dg2pf.getJson(`/jobs/${from}`)).spec);
    form.dataset.ready = "true";
  } catch (e) {
    dg2pf.loadFailed("fields-loading", e); // the form itself did not come: nothing to submit
    dg2pf.showError("submit-error", e);
  }
});
