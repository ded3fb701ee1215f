// Feature page: a dictionary latent's decoded tokens, density, top contexts token by token, and its links.
"use strict";

(async function () {
  const page = document.getElementById("page");
  await LM.header("feature");
  if (document.getElementById("page-error")) return;
  const name = decodeURIComponent(location.pathname.split("/").pop());
  const { el } = LM;
  const f = await LM.api(`/api/features/${name}`);
  document.title = `lmatlas · ${f.name}`;
  const kind = f.kind === "transcoder" ? "transcoder latent" : "SAE latent";
  const next = `${f.site}${(f.feature + 1) % f.n_latents}`;
  page.append(el("h1", { id: "feature-title" }, `Feature ${f.name}`),
    el("p", { class: "muted" }, `${kind} ${f.feature} of ${f.n_latents} at ${f.site.replace(/\.F$/, "")}` +
      (f.density === null ? "" : ` · active on ${LM.fmt(100 * f.density, 2)}% of corpus tokens`) +
      (f.max === null ? "" : ` · max ${LM.fmt(f.max)}`), " · ", el("a", { href: `/feature/${next}` }, "next feature")));
  const tokens = el("section", { class: "panel", id: "tokens" });
  const links = el("section", { class: "panel", id: "links" });
  const contexts = el("section", { class: "panel", id: "contexts" });
  page.append(el("div", { class: "row" }, tokens, links), contexts);
  drawTokens(tokens, f);
  drawLinks(links, f);
  drawContexts(contexts, f);
  LM.ready();
})().catch((error) => LM.fail(document.getElementById("page"), error));

function featureTokens(id, title, pairs) {
  const { el } = LM;
  const max = Math.max(1e-12, ...pairs.map((p) => Math.abs(p.value || 0)));
  return el("div", { style: "flex:1 1 180px" }, el("h2", {}, title),
    pairs.length ? el("table", { id }, pairs.map((p) => el("tr", {},
      el("td", {}, LM.tokenLink(p.token, p.value)),
      el("td", { class: "num" }, LM.fmt(p.value, 3)), el("td", {}, LM.bar(p.value, max, 50)))))
      : el("p", { class: "note" }, "not in this atlas"));
}

function drawTokens(panel, f) {
  panel.append(LM.el("div", { class: "row" },
    featureTokens("promoted", "Promotes", f.promoted.slice(0, 15)),
    featureTokens("suppressed", "Suppresses", f.suppressed.slice(0, 15))),
  LM.el("p", { class: "note" }, "Logit per unit of activation: the decoder direction through the final norm's " +
    "gain and the unembedding."));
}

const RELATIONS = [["writes", "Written by (head OV)"], ["reads_q", "Read by queries"], ["reads_k", "Read by keys"],
  ["aligns", "Aligned neurons (cosine)"]];

function drawLinks(panel, f) {
  const { el } = LM;
  panel.append(el("h2", {}, "Heads and neurons"));
  const url = (link) => link.kind === "neuron" ? LM.neuronUrl(link.unit) : LM.headUrl(link.unit);
  RELATIONS.forEach(([key, title]) => {
    const rows = (f.links[key] || []).slice(0, 8);
    if (!rows.length) return;
    const max = Math.max(1e-12, ...rows.map((r) => Math.abs(r.score)));
    panel.append(el("h3", {}, title), el("table", { id: `links-${key}` }, rows.map((r) => el("tr", {},
      el("td", {}, el("a", { href: url(r) }, r.unit)), el("td", { class: "num" }, LM.fmt(r.score, 3)),
      el("td", {}, LM.bar(r.score, max, 50))))));
  });
  panel.append(el("p", { class: "note" }, "From weights alone: OV output along the decoder direction, its norm " +
    "through each head's query or key projection, and the cosine with each neuron's output row."));
}

function drawContexts(panel, f) {
  const { el } = LM;
  panel.append(el("h2", {}, "Top-activating contexts"));
  if (!f.contexts.length) {
    panel.append(el("p", { class: "note" }, "The latent never fired on the atlas's corpus."));
    return;
  }
  const max = Math.max(1e-12, ...f.contexts.map((c) => c.activation || 0));
  f.contexts.forEach((c) => panel.append(el("div", { class: "window context" },
    el("div", { class: "note" }, `#${c.rank + 1} · activation ${LM.fmt(c.activation)}`),
    LM.heatTokens(c.tokens, c.values, { max, mark: c.peak, label: "activation" }))));
}
