// lmatlas explorer: helpers every page uses (no framework, no network beyond this server).
"use strict";

const LM = {};

// JSON from the explorer's API; a failed request throws an Error carrying the server's message.
LM.api = async function (path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const message = data && data.error ? data.error.message : `${response.status} ${response.statusText}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return data;
};

// el("a", {href: "/x", class: "tok"}, "text", child, ...) -> element
LM.el = function (tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
};

// A token as it reads: spaces and newlines made visible.
LM.show = (token) => (token === null || token === undefined) ? "∅" :
  token.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/^ /, "·").replace(/ $/, "·") || "∅";
LM.plain = (token) => (token || "").replace(/\n/g, "↵\n");

LM.fmt = function (x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
  return x.toFixed(digits);
};

LM.headUrl = (name) => `/head/${name}`;
LM.neuronUrl = (name) => `/neuron/${name}`;
LM.searchUrl = (q) => `/search?q=${encodeURIComponent(q)}`;

// The edit playground's URL grammar: /edit?ablate=L5.H3&scale=L2.N10:0.5&set=L0.N3:4&prompt=...
// The playground keeps its last edit in sessionStorage, so "add to edit" from any page adds to it.
LM.EDIT_KEY = "lmatlas.edit";
LM.editUrl = function (kind, target, value) {
  let params;
  try { params = new URLSearchParams(sessionStorage.getItem(LM.EDIT_KEY) || ""); }
  catch (error) { params = new URLSearchParams(); }  // storage may be off: start a fresh edit
  params.append(kind, value === undefined || value === null ? target : `${target}:${value}`);
  return `/edit?${params}`;
};
LM.editLink = (label, kind, target, value) => LM.el("a", { href: LM.editUrl(kind, target, value),
  class: "edit-link", title: `open the edit playground with ${kind} ${target} added` }, label);

// An SVG element: svg("line", {x1: 0, ...}).
LM.svg = function (tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) if (value !== undefined && value !== null) node.setAttribute(key, value);
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
};

// A token chip linking to the search for it.
LM.tokenLink = (token, value) => LM.el("a", { class: "tok", href: LM.searchUrl(token),
  title: value === undefined ? `search ${JSON.stringify(token)}` : `${JSON.stringify(token)}: ${LM.fmt(value)}` },
  LM.show(token));

// Colours of head types: a fixed table for the built-in detectors, a stable hue for any other.
LM.TYPE_COLOURS = {
  previous_token: "#4c78a8", duplicate_token: "#72b7b2", induction: "#e45756", successor: "#f58518",
  retrieval: "#b279a2", full_context: "#54a24b", attention_sink: "#9d755d", copy_suppression: "#eeca3b",
  local: "#88d27a", dormant: "#bab0ac",
};
LM.NO_TYPE = "#e4e6eb";
LM.typeColour = function (type) {
  if (!type) return LM.NO_TYPE;
  if (LM.TYPE_COLOURS[type]) return LM.TYPE_COLOURS[type];
  let hash = 0;
  for (const c of type) hash = (hash * 31 + c.charCodeAt(0)) % 360;
  return `hsl(${hash}, 55%, 55%)`;
};

// Heat colour for a value in [0, 1] (white -> orange) or signed in [-1, 1] (blue <- white -> orange).
LM.heat = function (v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "transparent";
  const a = Math.min(1, Math.abs(v));
  return v >= 0 ? `rgba(232, 89, 12, ${a * 0.85})` : `rgba(47, 95, 208, ${a * 0.7})`;
};

// A small horizontal bar for a value relative to a maximum.
LM.bar = (value, max, width = 80) => LM.el("span", { class: "bar" + (value < 0 ? " neg" : ""),
  style: `width:${Math.max(1, Math.round(width * Math.min(1, Math.abs(value || 0) / (max || 1))))}px` });

// The header: brand, navigation, a "go to" box (L5.H3, L12.N1031 or any token), the model's name.
LM.header = async function (here) {
  const pages = [["overview", "/", "Overview"], ["search", "/search", "Search"], ["lens", "/lens", "Lens"],
                 ["edit", "/edit", "Edit"], ["circuit", "/circuit", "Circuits"], ["diff", "/diff", "Diff"]];
  const go = LM.el("input", { type: "text", id: "goto", placeholder: "L5.H3, L12.N1031 or a token",
                              "aria-label": "go to a head, a neuron or a token" });
  const form = LM.el("form", { onsubmit: (event) => {
    event.preventDefault();
    const text = go.value;
    const name = text.trim();
    if (/^L\d+\.H\d+$/.test(name)) location.href = LM.headUrl(name);
    else if (/^L\d+\.N\d+$/.test(name)) location.href = LM.neuronUrl(name);
    else if (/^L\d+(\.[a-z_]+){0,2}\.F\d+$/.test(name)) location.href = `/feature/${name}`;
    else if (text) location.href = LM.searchUrl(text);
  } }, go);
  const model = LM.el("span", { class: "model" });
  const nav = LM.el("nav", {}, pages.map(([key, href, label]) =>
    LM.el("a", { href, class: key === here ? "here" : null, id: `nav-${key}` }, label)));
  document.getElementById("top").append(LM.el("a", { class: "brand", href: "/" }, "lmatlas"), nav, form, model);
  LM.info = await LM.api("/api/atlas");
  const card = LM.info.model;
  model.textContent = `${card.source} · ${card.layers} layers · ${card.query_heads} heads · ` +
    `${card.neurons_per_layer} neurons/layer` + (LM.info.available.model ? " · live model" : "");
  return LM.info;
};

// Show an error inside a container instead of failing silently.
LM.fail = function (container, error) {
  container.replaceChildren(LM.el("p", { class: "error" }, error.message || String(error)));
};

// Tokens as spans with a heat background; hover shows the value.
LM.heatTokens = function (tokens, values, options = {}) {
  const max = options.max || Math.max(1e-12, ...values.map((v) => Math.abs(v || 0)));
  const box = LM.el("div", { class: "tokens" });
  tokens.forEach((token, i) => {
    const v = values[i];
    box.append(LM.el("span", {
      class: i === options.mark ? "q" : null, "data-i": i, "data-value": v,
      style: `background:${LM.heat(v === null ? null : v / max)}`,
      title: `${JSON.stringify(token)}  ${options.label || "value"} ${LM.fmt(v, 4)}`,
    }, LM.plain(token)));
  });
  (options.after || []).forEach((token) => box.append(LM.el("span", { class: "after" }, LM.plain(token))));
  return box;
};

// A live-model pane: textarea + button, or a note when the server has no model.
LM.livePane = function (container, { placeholder, run, label = "Run" }) {
  if (!LM.info.available.model) {
    container.append(LM.el("p", { class: "note", id: "no-model" },
      "Start the explorer with --model to run typed prompts through the model."));
    return;
  }
  const text = LM.el("textarea", { id: "prompt", placeholder });
  const status = LM.el("span", { class: "note", id: "live-status" });
  const out = LM.el("div", { class: "live-out", id: "live-out" });
  const button = LM.el("button", { id: "run", onclick: async () => {
    button.disabled = true;
    status.textContent = "running…";
    const started = performance.now();
    try {
      await run(text.value, out);
      status.textContent = `done in ${Math.round(performance.now() - started)} ms`;
    } catch (error) {
      status.textContent = "";
      LM.fail(out, error);
    } finally {
      button.disabled = false;
    }
  } }, label);
  container.append(text, LM.el("div", { class: "controls" }, button, status), out);
};

// The page has drawn what it fetched: mark it (tests and the benchmark wait for this).
LM.ready = function () {
  LM.readyAt = performance.now();
  document.body.dataset.ready = "1";
};
