// Shared by every page of the dashboard: the token, calls to the JSON API, and building the DOM.
// Nothing from the API is ever parsed as HTML: text goes in as text nodes (h(), textContent), so a
// job named "<img src=x onerror=...>" shows those characters. Pages register with dg2pf.start(fn).
"use strict";

const dg2pf = (() => {
  const TOKEN_KEY = "dg2pf.token";
  const root = document.body.dataset.root || "";

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY);
  }

  function forgetToken() {
    sessionStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(TOKEN_KEY);
  }

  class ApiError extends Error {
    constructor(status, error) {
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.type = error.type;
      this.field = error.field || null;
    }
  }

  // fetch() against the API with the stored token. Resolves to the Response for a 2xx; throws an
  // ApiError with the service's {type, field, message} otherwise. 401/403 open the login form.
  async function api(path, { method = "GET", json, body, headers = {} } = {}) {
    const sent = { ...headers };
    const t = token();
    if (t) sent.Authorization = `Bearer ${t}`;
    if (json !== undefined) {
      sent["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    let r;
    try {
      r = await fetch(root + path, { method, headers: sent, body, cache: "no-store" });
    } catch (e) {
      throw new ApiError(0, { type: "unreachable", message: `the service does not answer (${e.message})` });
    }
    if (r.ok) return r;
    let error = null;
    try {
      error = (await r.json()).error;
    } catch (e) { /* not the service's JSON: a proxy's page */ }
    error = error || { type: `http_${r.status}`, message: `${r.status} ${r.statusText}` };
    if (r.status === 401 || r.status === 403) showLogin(r.status, error.message);
    throw new ApiError(r.status, error);
  }

  async function getJson(path, options) {
    const r = await api(path, options);
    return r.status === 204 ? null : r.json();
  }

  // --- login ----------------------------------------------------------------------------------

  let pageStopped = false;

  function showLogin(status, message) {
    pageStopped = true; // polling loops end: nothing more to show until a token is given
    if (status === 403) forgetToken();
    const text = status === 403 ? `The service refused that token (${message}).`
                                : "This service needs a bearer token (one of its DG2PF_API_TOKENS).";
    document.getElementById("login-message").textContent = text;
    document.getElementById("content").hidden = true;
    document.getElementById("login").hidden = false;
    document.getElementById("login-token").focus();
  }

  function setUpLogin() {
    document.getElementById("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = document.getElementById("login-token").value.trim();
      if (!value) return;
      forgetToken();
      (document.getElementById("login-remember").checked ? localStorage : sessionStorage).setItem(TOKEN_KEY, value);
      location.reload();
    });
    const logout = document.getElementById("logout");
    logout.hidden = !token();
    logout.addEventListener("click", () => {
      forgetToken();
      location.reload();
    });
  }

  // --- DOM ------------------------------------------------------------------------------------

  // h("td", {class: "x", onclick: fn}, "text", child, ...): an element; strings become text nodes.
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "data") Object.assign(el.dataset, value);
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  // A placeholder where data will be (<p class="placeholder" data-empty="None yet.">Loading…</p>): it
  // says "Loading…" until the data's first answer, then its empty text if there really is nothing, or
  // nothing (hidden) if there is; a first fetch that fails says so instead of "none". Once loaded, a
  // later failure leaves what was shown (the page's error line says why it is not refreshed).
  const LOADING = "Loading…";

  function loading(id) {
    const el = document.getElementById(id);
    el.dataset.state = "loading";
    el.textContent = LOADING;
    el.hidden = false;
  }

  function loaded(id, empty) {
    const el = document.getElementById(id);
    el.dataset.state = empty ? "empty" : "loaded";
    el.textContent = el.dataset.empty;
    el.hidden = !empty;
  }

  function loadFailed(id, error) {
    const el = document.getElementById(id);
    if (el.dataset.state === "loaded" || el.dataset.state === "empty") return;
    el.dataset.state = "failed";
    el.textContent = `Not loaded: ${error.message || String(error)}`;
    el.hidden = false;
  }

  function showError(id, error) {
    const el = document.getElementById(id);
    if (!el) return;
    el.textContent = error ? (error.message || String(error)) : "";
    el.hidden = !error;
  }

  // --- formats --------------------------------------------------------------------------------

  const num = (x) => (typeof x === "number" && Number.isFinite(x) ? x : null);
  const fraction = (x, digits = 2) => (num(x) === null ? "–" : `${(x * 100).toFixed(digits)}%`);
  const percent = (x, digits = 2) => (num(x) === null ? "–" : `${x.toFixed(digits)}%`);

  function date(text) {
    if (!text) return null;
    // The API answers in UTC; a timestamp without an offset is UTC too, not the browser's local time.
    return new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(text) ? text : `${text}Z`);
  }

  function duration(seconds) {
    if (num(seconds) === null || seconds < 0) return "–";
    const s = Math.round(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function when(text) {
    const d = date(text);
    return d ? d.toLocaleString() : "–";
  }

  // Seconds a job has run (or waited, while queued): start to end, or to now.
  function jobSeconds(job) {
    const start = date(job.started_at || job.created_at);
    const end = date(job.finished_at) || new Date();
    return start ? (end - start) / 1000 : null;
  }

  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

  // The history as plotted: one record per whole epoch (a resumed run's latest), in order.
  function epochRecords(history) {
    const byEpoch = new Map();
    for (const r of history || []) {
      if (r && Number.isInteger(r.epoch)) byEpoch.set(r.epoch, r);
    }
    return [...byEpoch.keys()].sort((a, b) => a - b).map((e) => byEpoch.get(e));
  }

  // --- page life ------------------------------------------------------------------------------

  // Calls fn every `ms` (the next call once the last has finished) until it returns false, stop() is
  // called, the page stops (login shown) or fn throws an authentication error.
  function every(ms, fn) {
    let timer = null;
    let stopped = false;
    const tick = async () => {
      timer = null;
      if (pageStopped || stopped) return;
      let again = true;
      try {
        again = (await fn()) !== false;
      } catch (e) {
        again = !(e instanceof ApiError && (e.status === 401 || e.status === 403));
      }
      if (again && !pageStopped && !stopped) timer = setTimeout(tick, ms);
    };
    tick();
    return { stop: () => { stopped = true; clearTimeout(timer); } };
  }

  function start(fn) {
    const run = () => {
      setUpLogin();
      fn();
    };
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", run);
    else run();
  }

  return {
    root, api, getJson, ApiError, h, showError, loading, loaded, loadFailed, fraction, percent, duration, when, date,
    jobSeconds, num, TERMINAL, epochRecords, every, start, token,
  };
})();
