// Shared by the circuit and head pages: why a head attends where it does on a typed prompt.
"use strict";

// Why the head attends where it does on a typed prompt: its score split over upstream writes (query, key and
// value sides), from POST /api/circuit/attention-sources.
function explainPanel(head) {
  const { el } = LM;
  const panel = el("section", { class: "panel", id: "attention-sources" },
    el("h2", {}, `Why ${head} attends where it does`));
  const position = el("input", { type: "number", id: "query-pos", value: -1, "aria-label": "query position",
    style: "width: 5em" });
  LM.livePane(panel, { placeholder: "a prompt for the head to read", label: "Explain", run: async (prompt, out) => {
    const data = await LM.api("/api/circuit/attention-sources", { head, prompt, query_pos: Number(position.value) });
    out.replaceChildren(el("p", { class: "note", id: "attention-sources-summary" },
      `query ${data.query_pos} ${JSON.stringify(data.tokens[data.query_pos])} on key ${data.key_pos} ` +
      `${JSON.stringify(data.tokens[data.key_pos])}: score ${LM.fmt(data.score)}, attention ${LM.fmt(data.probability)}` +
      ` (remainders: query ${LM.fmt(data.rest.query_remainder, 4)}, key ${LM.fmt(data.rest.key_remainder, 4)})`),
    el("div", { class: "controls" }, ...["query", "key", "value"].map((side) => sourceTable(side, data[`${side}_side`]))));
  } });
  panel.insertBefore(el("label", { class: "note" }, "query position ", position), panel.children[1] || null);
  return panel;
}

function sourceTable(side, parts) {
  const { el } = LM;
  const what = side === "value" ? "share of its write" : "contribution to the score";
  return el("table", { class: "sources", "data-side": side, style: "width: auto; margin-right: 2em" },
    el("caption", {}, `${side} side: ${what}`),
    ...parts.map((p) => el("tr", {}, el("td", {}, p.source), el("td", {}, LM.fmt(p.value, 3)))));
}
