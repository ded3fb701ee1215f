// Search: a token or word -> the heads and neurons that write it, ranked.
"use strict";

(async function () {
  const page = document.getElementById("page");
  await LM.header("search");
  const { el } = LM;
  const q = new URLSearchParams(location.search).get("q") || "";
  const input = el("input", { type: "text", id: "search-q", value: q, placeholder: "a token, e.g. ' dog'",
    style: "width:320px;font-family:var(--mono)" });
  const results = el("div", { id: "results" });
  const form = el("form", { class: "controls", onsubmit: (event) => {
    event.preventDefault();
    location.href = LM.searchUrl(input.value);
  } }, input, el("button", { type: "submit" }, "Search"));
  page.append(el("h1", {}, "Who writes a token?"), el("section", { class: "panel" }, form,
    el("p", { class: "note" }, "Every head and neuron ranked by the logit it adds to the token (with and without a " +
      "leading space) through the final norm as the model applies it: a neuron where it adds most on reference " +
      "text, a head attending to its best source token. One scale for both kinds."), results));
  if (q) {
    try {
      const data = await LM.api(`/api/search?q=${encodeURIComponent(q)}&limit=50`);
      show(results, data);
    } catch (error) {
      LM.fail(results, error);
    }
  }
  LM.ready();
})().catch((error) => LM.fail(document.getElementById("page"), error));

function labelMatches(data) {
  const { el } = LM;
  if (!data.labels || !data.labels.length) return null;
  return el("div", { id: "label-matches" }, el("h2", {}, "Labels mentioning it"),
    el("table", {}, data.labels.map((r) => el("tr", { class: `label-match ${r.kind}` },
      el("td", {}, el("a", { href: r.kind === "head" ? LM.headUrl(r.unit) : LM.neuronUrl(r.unit) }, r.unit)),
      el("td", {}, r.sentence)))));
}

function show(box, data) {
  const { el } = LM;
  if (!data.results.length && data.labels && data.labels.length) {
    box.replaceChildren(labelMatches(data));
    return;
  }
  if (!data.results.length) {
    box.replaceChildren(el("p", { class: "muted", id: "no-results" }, `Nothing in this atlas writes ${JSON.stringify(data.query)}.`));
    return;
  }
  const skip = new Set(["kind", "name", "layer", "index"]);
  const extra = Object.keys(data.results[0]).filter((k) => !skip.has(k));
  box.replaceChildren(el("table", { id: "result-table" },
    el("tr", {}, el("th", {}, "kind"), el("th", {}, "name"), extra.map((k) => el("th", {}, k.replace(/_/g, " ")))),
    data.results.map((r) => el("tr", { class: `result ${r.kind}` },
      el("td", {}, r.kind),
      el("td", {}, el("a", { href: r.kind === "head" ? LM.headUrl(r.name) : LM.neuronUrl(r.name),
        class: "result-link" }, r.name)),
      extra.map((k) => el("td", { class: typeof r[k] === "number" ? "num" : null },
        Array.isArray(r[k]) ? r[k].map((t) => typeof t === "string" ? LM.tokenLink(t) : LM.fmt(t)) : LM.fmt(r[k])))))),
  labelMatches(data));
}
