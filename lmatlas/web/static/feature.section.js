// The features section of head and neuron pages: the dictionary features this head or neuron is linked to.
"use strict";

LM.featureSection = async function (unit) {
  const { el } = LM;
  const data = await LM.api(`/api/features/linked/${unit}`);
  if (!data.features.length) return null;
  const what = { writes: "writes it (OV)", reads_q: "reads it (query)", reads_k: "reads it (key)",
                 aligns: "aligns (cosine)" };
  return el("section", { class: "panel", id: "features" }, el("h2", {}, "Features"),
    el("table", { id: "features-table" }, data.features.map((f) => el("tr", {},
      el("td", {}, el("a", { href: `/feature/${f.name}` }, f.name)),
      el("td", {}, what[f.relation] || f.relation), el("td", { class: "num" }, LM.fmt(f.score, 3)),
      el("td", { class: "note" }, (f.top_tokens || []).map(LM.plain).join(" · "))))),
    el("p", { class: "note" }, "Features (dictionary latents) whose strongest links include this " +
      (unit.includes(".H") ? "head" : "neuron") + ", strongest first."));
};

// On a head or neuron page, once the page has drawn what it fetched, add the section below it.
(function () {
  const kind = document.body.dataset.page;
  if (kind !== "head" && kind !== "neuron") return;
  const unit = decodeURIComponent(location.pathname.split("/").pop());
  const add = () => {
    if (document.getElementById("page-error")) return;
    LM.featureSection(unit).then((section) => section && document.getElementById("page").append(section))
      .catch((error) => {
        const panel = LM.el("section", { class: "panel", id: "features" });
        document.getElementById("page").append(panel);
        LM.fail(panel, error);
      });
  };
  if (document.body.dataset.ready) return add();
  const watch = new MutationObserver(() => {
    if (!document.body.dataset.ready) return;
    watch.disconnect();
    add();
  });
  watch.observe(document.body, { attributes: true, attributeFilter: ["data-ready"] });
})();
