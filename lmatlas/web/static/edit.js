// Edit playground: heads and neurons to ablate, scale or clamp; the plain and the edited continuation side by side.
// The edit lives in the URL (/edit?ablate=L5.H3&ablate=L1.N2:mean&scale=L2.N10:0.5&set=L0.N3:4&prompt=...)
// and in sessionStorage, so "add to edit" links on other pages add to it.
"use strict";

// kind -> its number (name in the API, default); ablate takes a "how" instead (zero or mean).
const EDIT_KINDS = { ablate: null, scale: ["factor", 0.5], set: ["value", 5] };
const HOWS = ["zero", "mean"];

(async function () {
  const page = document.getElementById("page");
  await LM.header("edit");
  if (document.getElementById("page-error")) return;
  const { el } = LM;
  const live = await LM.api("/api/live");
  const params = new URLSearchParams(location.search);
  const rows = parseEdit(params);

  const list = el("div", { id: "edit-rows" });
  const prompt = el("textarea", { id: "prompt", placeholder: "Once upon a time" }, params.get("prompt") || "");
  const tokens = el("input", { type: "number", id: "max-new-tokens", min: 1, max: LM.info.limits.new_tokens,
    value: Math.min(24, LM.info.limits.new_tokens), style: "width:70px" });
  const chat = el("input", { type: "checkbox", id: "chat", checked: live.chat_template || null,
    disabled: live.chat_template ? null : true });
  const strategy = el("select", { id: "strategy", "aria-label": "decoding strategy" },
    live.strategies.map((name) => el("option", { value: name, selected: name === "greedy" || null }, name)));
  const cache = kvControls(live);
  const status = el("span", { class: "note", id: "edit-status" });
  const out = el("div", { id: "edit-out" });
  const sync = () => {
    const query = editQuery(rows, prompt.value);
    history.replaceState(null, "", `/edit${query ? "?" + query : ""}`);
    try { sessionStorage.setItem(LM.EDIT_KEY, editQuery(rows, "")); } catch (error) { /* storage off: URL only */ }
  };
  const redraw = () => { list.replaceChildren(...rows.map((row, i) => rowEditor(row, i, rows, redraw, sync))); sync(); };
  const generate = el("button", { id: "generate", onclick: async () => {
    generate.disabled = true;
    status.textContent = "generating…";
    const started = performance.now();
    try {
      const data = await LM.api("/api/edit", { prompt: prompt.value, max_new_tokens: Number(tokens.value),
        chat: chat.checked, interventions: interventions(rows), strategy: strategy.value, ...cache.request() });
      drawComparison(out, data);
      status.textContent = `done in ${Math.round(performance.now() - started)} ms`;
    } catch (error) {
      status.textContent = "";
      LM.fail(out, error);
    } finally {
      generate.disabled = false;
    }
  } }, "Generate");
  const save = el("button", { id: "download", class: "plain", onclick: async () => {
    try {
      const file = await LM.api("/api/edit/file", { interventions: interventions(rows) });
      const url = URL.createObjectURL(new Blob([JSON.stringify(file, null, 2) + "\n"], { type: "application/json" }));
      const link = el("a", { href: url, download: "playground.edit.json" });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 1000);
    } catch (error) {
      LM.fail(out, error);
    }
  } }, "Download edit (JSON)");
  prompt.addEventListener("input", sync);

  page.append(el("h1", {}, "Edit playground"),
    el("section", { class: "panel", id: "edit-panel" }, el("h2", {}, "Interventions"),
      el("p", { class: "note" }, "Applied in order at every generation step. A head is edited through its attn.z " +
        "(what it reads from the values, before W_O); a neuron through its activation. Add targets here or with " +
        "the “add to edit” links on head and neuron pages."),
      list,
      el("div", { class: "controls" }, el("button", { id: "add-row", class: "plain", onclick: () => {
        rows.push({ kind: "ablate", target: "", value: "zero" });
        redraw();
      } }, "+ add"), save),
      el("h2", {}, "Prompt"), prompt,
      el("div", { class: "controls" }, generate, el("label", {}, "new tokens ", tokens),
        el("label", { title: live.chat_template ? "wrap the prompt in the chat template" :
          "this model's tokenizer has no chat template" }, chat, " chat template"), status),
      el("div", { class: "controls", id: "run-options" }, el("label", {}, "strategy ", strategy), cache.element)),
    out);
  redraw();
  LM.ready();
})().catch((error) => LM.fail(document.getElementById("page"), error));

// The KV cache both continuations use, one of the registry's policies (/api/live lists them with the request
// fields each needs): the full cache, head-wise (a fraction of KV heads keep everything, chosen by the atlas's
// census), SnapKV (each KV head keeps its N most attended prompt entries), hybrid (both), full prefill, ...
const KV_INPUTS = {
  kv_budget: { value: 0.25, hint: "fraction of KV heads kept whole (others: 4 sink + 256 recent)" },
  kv_snap: { value: 256, hint: "prompt entries each SnapKV head keeps" },
};

function kvControls(live) {
  const { el } = LM;
  const needs = live.kv_inputs || {};
  const names = ["default", ...(live.kv_policies || []).filter((name) => name !== "default")];
  const usable = (name) => live.kv_budget || !(needs[name] || []).includes("kv_budget");
  const kind = el("select", { id: "kv-kind", "aria-label": "KV cache" }, names.map((name) =>
    el("option", { value: name, disabled: usable(name) ? null : true }, name === "default" ? "full cache" : name)));
  const fields = Object.fromEntries(Object.entries(KV_INPUTS).map(([field, spec]) => [field,
    el("input", { type: "number", id: field.replace("_", "-"), step: "any", style: "width:80px",
      title: spec.hint, "aria-label": spec.hint, hidden: true })]));
  const hint = el("span", { class: "note", id: "kv-hint" });
  kind.addEventListener("change", () => {
    const wanted = needs[kind.value] || [];
    for (const [field, input] of Object.entries(fields)) {
      input.hidden = !wanted.includes(field);
      input.value = input.hidden ? "" : KV_INPUTS[field].value;
    }
    hint.textContent = wanted.map((field) => KV_INPUTS[field] ? KV_INPUTS[field].hint : field).join("; ");
  });
  const request = () => {
    if (kind.value === "default") return {};
    const body = { kv: kind.value };
    for (const field of needs[kind.value] || []) if (fields[field]) body[field] = Number(fields[field].value);
    return body;
  };
  return { element: el("label", { title: live.kv_budget ? "" : "head-wise needs the atlas's census scores" },
    "KV cache ", kind, " ", ...Object.values(fields), " ", hint), request };
}

// URL parameters -> [{kind, target, value}] ("scale=L2.N10:0.5" -> scale L2.N10 by 0.5).
function parseEdit(params) {
  const rows = [];
  for (const [kind, text] of params) {
    if (!(kind in EDIT_KINDS)) continue;
    const [target, value] = text.split(":");
    const spec = EDIT_KINDS[kind];
    const how = HOWS.includes(value) ? value : "zero";
    rows.push({ kind, target: target.trim(), value: spec ? (value === undefined ? spec[1] : Number(value)) : how });
  }
  return rows;
}

function editQuery(rows, prompt) {
  const params = new URLSearchParams();
  rows.filter((r) => r.target).forEach((r) => params.append(r.kind,
    EDIT_KINDS[r.kind] || r.value === "mean" ? `${r.target}:${r.value}` : r.target));
  if (prompt) params.set("prompt", prompt);
  return params.toString();
}

function interventions(rows) {
  return rows.filter((r) => r.target.trim()).map((r) => {
    const spec = EDIT_KINDS[r.kind];
    return spec ? { kind: r.kind, target: r.target.trim(), [spec[0]]: Number(r.value) }
      : { kind: r.kind, target: r.target.trim(), how: r.value || "zero" };
  });
}

// One intervention: kind, target, its number, a link to the target's page, remove.
function rowEditor(row, i, rows, redraw, sync) {
  const { el } = LM;
  const kind = el("select", { class: "edit-kind", "aria-label": "intervention", onchange: () => {
    row.kind = kind.value;
    row.value = EDIT_KINDS[row.kind] ? EDIT_KINDS[row.kind][1] : "zero";
    redraw();
  } }, Object.keys(EDIT_KINDS).map((k) => el("option", { value: k, selected: k === row.kind || null }, k)));
  const target = el("input", { type: "text", class: "edit-target", value: row.target, placeholder: "L5.H3 or L12.N1031",
    "aria-label": "target", oninput: () => { row.target = target.value; sync(); } });
  const spec = EDIT_KINDS[row.kind];
  const value = spec ? el("input", { type: "number", class: "edit-value", step: "any", value: row.value,
    "aria-label": spec[0], style: "width:80px", oninput: () => { row.value = value.value; sync(); } })
    : el("select", { class: "edit-how", "aria-label": "ablate how", title: "zero, or its mean over the model's corpus",
      onchange: () => { row.value = value.value; sync(); } },
    HOWS.map((h) => el("option", { value: h, selected: h === row.value || null }, h)));
  const name = row.target.trim();
  const link = /^L\d+\.H\d+$/.test(name) ? LM.headUrl(name) : /^L\d+\.N\d+$/.test(name) ? LM.neuronUrl(name) : null;
  return el("div", { class: "controls edit-row", "data-i": i }, kind, target,
    spec ? el("label", { class: "note" }, spec[0] === "factor" ? "× " : "= ", value) : value,
    link ? el("a", { href: link }, "open") : null,
    el("button", { class: "plain", title: "remove", onclick: () => { rows.splice(i, 1); redraw(); } }, "×"));
}

function kvText(kv) {
  if (!kv || kv.method === "default") return "full";
  return Object.entries(kv).map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
}

// The two continuations side by side; tokens from the first difference on are marked.
function drawComparison(out, data) {
  const { el } = LM;
  const at = data.first_difference;
  const differ = at === null ? "The edited continuation is the same as the plain one." :
    `They first differ at generated token ${at}: ${JSON.stringify(data.plain.tokens[at] ?? "(end)")} ` +
    `→ ${JSON.stringify(data.edited.tokens[at] ?? "(end)")}.`;
  const column = (id, title, c) => el("section", { class: "panel", id },
    el("h2", {}, title),
    el("div", { class: "tokens continuation" },
      el("span", { class: "prompt-echo" }, LM.plain(data.prompt)),
      c.tokens.map((t, i) => el("span", {
        class: "gen" + (at !== null && i >= at ? " changed" : "") + (i === at ? " first" : ""), "data-i": i,
        title: `${JSON.stringify(t)}\nlog p plain ${LM.fmt(c.logprob_plain[i])} · edited ${LM.fmt(c.logprob_edited[i])}`,
      }, LM.plain(t)))),
    c.stopped_by ? el("p", { class: "note" }, `stopped: ${c.stopped_by}`) : null);
  out.replaceChildren(
    el("p", { id: "diff-note", class: at === null ? "muted" : "" }, differ,
      data.edit.length ? ` Edit: ${data.edit.join(" | ")}` : " No intervention: both runs are the plain model."),
    el("div", { class: "row" }, column("plain", "Plain model", data.plain), column("edited", "Edited model", data.edited)),
    el("p", { class: "note", id: "run-note" }, `${data.prompt_tokens} prompt tokens · ${data.strategy} · ` +
      `KV cache ${kvText(data.kv)} · hover a token for its ` +
      "log-probability under both models; highlighted tokens come after the first difference."));
}
