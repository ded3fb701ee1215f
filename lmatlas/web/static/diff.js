// Diff of two atlases of one architecture: label flips, changed head scores, neurons, importance.
"use strict";

(async function () {
  const page = document.getElementById("page");
  await LM.header("diff");
  if (document.getElementById("page-error")) return;
  const { el } = LM;
  const d = await LM.api("/api/diff");
  page.append(el("h1", {}, "Atlas diff"),
    el("section", { class: "panel", id: "diff-summary" }, el("table", {},
      [["A", d.a], ["B", d.b], ["heads compared", d.heads_compared], ["label flips", d.label_flips.length],
       ["neurons compared", d.neurons_compared],
       ["top token unchanged", d.top_token_unchanged === null ? "–" : `${LM.fmt(100 * d.top_token_unchanged, 1)}%`]]
        .map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))))));
  const sections = [["Label flips", d.label_flips], ["Most changed head scores", d.most_changed_heads],
    ["Most changed neurons (top tokens)", d.most_changed_neurons], ["Importance changes", d.importance_changes]];
  for (const [title, rows] of sections) page.append(table(title, rows));
  LM.ready();
})().catch((error) => LM.fail(document.getElementById("page"), error));

function table(title, rows) {
  const { el } = LM;
  const panel = el("section", { class: "panel diff-table" }, el("h2", {}, title));
  if (!rows.length) {
    panel.append(el("p", { class: "note" }, "none"));
    return panel;
  }
  const keys = Object.keys(rows[0]);
  const cell = (k, v) => {
    if (k === "head") return el("a", { href: LM.headUrl(v) }, v);
    if (k === "neuron") return el("a", { href: LM.neuronUrl(v) }, v);
    if (Array.isArray(v)) return v.map((t) => LM.tokenLink(t));
    return LM.fmt(v);
  };
  panel.append(el("table", {}, el("tr", {}, keys.map((k) => el("th", {}, k.replace(/_/g, " ")))),
    rows.map((r) => el("tr", {}, keys.map((k) => el("td", { class: typeof r[k] === "number" ? "num" : null },
      cell(k, r[k])))))));
  return panel;
}
