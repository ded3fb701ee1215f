// Lens: the logit lens of a typed prompt — layers x positions, each cell's top token and probability.
"use strict";

(async function () {
  const page = document.getElementById("page");
  await LM.header("lens");
  const { el } = LM;
  const panel = el("section", { class: "panel", id: "lens" });
  page.append(el("h1", {}, "Logit lens"), panel);
  panel.append(el("p", { class: "note" }, "Each layer's residual stream read through the final norm and the " +
    `unembedding (up to ${LM.info.limits.lens_tokens} tokens). Cell colour: probability of its top token; ` +
    "hover for the top tokens."));
  LM.livePane(panel, { placeholder: "The capital of France is", label: "Run the lens", run: async (prompt, out) => {
    const data = await LM.api("/api/lens", { prompt, k: 3 });
    out.replaceChildren(grid(data));
  } });
  LM.ready();
})().catch((error) => LM.fail(document.getElementById("page"), error));

function grid(data) {
  const { el } = LM;
  const rows = [];
  for (let r = data.layers.length - 1; r >= 0; r--) {
    rows.push(el("tr", {}, el("th", {}, data.layers[r]), data.cells[r].map((c, j) => el("td", {
      style: `background:${LM.heat(c.probs[0])}`,
      title: `${data.layers[r]}, position ${j} ${JSON.stringify(data.tokens[j])}\n` +
        c.tokens.map((t, i) => `${JSON.stringify(t)} ${LM.fmt(c.probs[i])}`).join("\n") +
        `\np(final ${JSON.stringify(data.final_tokens[j])}) ${LM.fmt(c.final_prob)} · entropy ${LM.fmt(c.entropy, 2)}`,
    }, LM.show(c.tokens[0])))));
  }
  // Column labels (the input tokens) above and below the rows, and no vertical scroll box: every layer, L0
  // included, stays on the page; only a long prompt scrolls sideways, with the layer names pinned at the left.
  const labels = () => el("tr", { class: "inputs" }, el("th", {}, "input"), data.tokens.map((t) => el("th", {}, LM.show(t))));
  return el("div", { class: "scroll-x", id: "lens-box" }, el("table", { class: "lens", id: "lens-table" },
    el("thead", {}, labels()), el("tbody", {}, rows), el("tfoot", {}, labels())));
}
