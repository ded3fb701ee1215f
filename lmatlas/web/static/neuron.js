// Neuron page: decoded tokens, activation density and histogram, top contexts token by token, live text.
"use strict";

(async function () {
  const page = document.getElementById("page");
  await LM.header("neuron");
  if (document.getElementById("page-error")) return;
  const name = decodeURIComponent(location.pathname.split("/").pop());
  const { el } = LM;
  const n = await LM.api(`/api/neurons/${name}`);
  document.title = `lmatlas · ${name}`;
  const st = n.stats;
  page.append(el("h1", { id: "neuron-title" }, `Neuron ${name}`),
    el("p", { id: "label-sentence", class: n.explanation && n.explanation.labelled ? "label" : "muted" },
      n.explanation ? n.explanation.sentence : "no label (the atlas has no stage labels)"),
    el("p", { class: "muted" }, `layer ${n.layer} · neuron ${n.neuron}` + (st ? ` · mean ${LM.fmt(st.mean)} · max ` +
      `${LM.fmt(st.max)} · active on ${LM.fmt(100 * st.frac_active, 1)}% of corpus tokens` : ""), " · ",
      el("a", { href: LM.neuronUrl(`L${n.layer}.N${(n.neuron + 1) % LM.info.model.neurons_per_layer}`) }, "next neuron"),
      LM.info.available.model ? [" · ", LM.editLink("add to edit: ablate", "ablate", name), " · ",
        LM.editLink(`clamp to ${LM.fmt(clampTo(st))}`, "set", name, clampTo(st))] : null));
  const tokens = el("section", { class: "panel", id: "tokens" });
  const hist = el("section", { class: "panel", id: "histogram" });
  const contexts = el("section", { class: "panel", id: "contexts" });
  const live = el("section", { class: "panel", id: "live" });
  page.append(el("div", { class: "row" }, tokens, hist), contexts, live);
  drawTokens(tokens, n);
  drawHistogram(hist, n);
  drawContexts(contexts, n);
  live.append(el("h2", {}, "Activations on your text"));
  LM.livePane(live, { placeholder: "Type some text…", run: async (prompt, out) => {
    const data = await LM.api(`/api/neurons/${name}/activations`, { prompt });
    const peak = Math.max(...data.activations);
    out.replaceChildren(LM.el("p", { class: "note" }, `${data.tokens.length} tokens · peak ${LM.fmt(peak)}`),
      LM.heatTokens(data.tokens, data.activations, { label: "activation" }));
  } });
  LM.ready();
})().catch((error) => LM.fail(document.getElementById("page"), error));

// A clamp value that makes the neuron fire hard: twice its corpus maximum (or 5 without statistics).
function clampTo(stats) {
  const max = stats && stats.max;
  return max && max > 0 ? Number((2 * max).toPrecision(3)) : 5;
}

function tokenTable(id, title, pairs) {
  const { el } = LM;
  const max = Math.max(1e-12, ...pairs.map((p) => Math.abs(p.value || 0)));
  return el("div", { style: "flex:1 1 180px" }, el("h2", {}, title),
    pairs.length ? el("table", { id }, pairs.map((p) => el("tr", {},
      el("td", {}, LM.tokenLink(p.token, p.value)),
      el("td", { class: "num" }, LM.fmt(p.value, 2)), el("td", {}, LM.bar(p.value, max, 50)))))
      : el("p", { class: "note" }, "not in this atlas"));
}

function drawTokens(panel, n) {
  panel.append(LM.el("div", { class: "row" },
    tokenTable("promoted", "Promotes", n.promoted.slice(0, 15)),
    tokenTable("suppressed", "Suppresses", n.suppressed.slice(0, 15)),
    tokenTable("exciting", "Excited by", n.exciting.slice(0, 15))),
  LM.el("p", { class: "note" }, "Promotes / suppresses: logit per unit of activation through the unembedding; " +
    "excited by: tokens whose embeddings most excite its input."));
}

function drawHistogram(panel, n) {
  const { el } = LM;
  panel.append(el("h2", {}, "Activation histogram"));
  if (!n.histogram) {
    panel.append(el("p", { class: "note" }, "Build the neuron_contexts stage to see it."));
    return;
  }
  const { lo, hi, counts } = n.histogram;
  const W = 420, H = 180, P = 26;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.id = "histogram-svg";
  const total = counts.reduce((a, b) => a + b, 0);
  const top = Math.log10(1 + Math.max(...counts));
  const bw = (W - 2 * P) / counts.length;
  counts.forEach((c, i) => {
    const h = top > 0 ? (H - 2 * P) * Math.log10(1 + c) / top : 0;
    const rect = document.createElementNS(ns, "rect");
    const left = lo + (hi - lo) * i / counts.length, right = lo + (hi - lo) * (i + 1) / counts.length;
    Object.entries({ x: P + i * bw + 1, y: H - P - h, width: Math.max(1, bw - 2), height: h,
      fill: right <= 0 ? "#9aa4b2" : "#e8590c" }).forEach(([k, v]) => rect.setAttribute(k, v));
    const title = document.createElementNS(ns, "title");
    title.textContent = `[${LM.fmt(left)}, ${LM.fmt(right)}): ${c} tokens`;
    rect.append(title);
    svg.append(rect);
  });
  const text = (x, y, s, anchor) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("text-anchor", anchor);
    t.textContent = s;
    svg.append(t);
  };
  text(P, H - 8, LM.fmt(lo), "start"); text(W - P, H - 8, LM.fmt(hi), "end");
  text(W / 2, H - 8, "activation (log count)", "middle");
  panel.append(svg, el("p", { class: "note" }, `${total} corpus tokens; grey bins are ≤ 0.`));
}

function drawContexts(panel, n) {
  const { el } = LM;
  panel.append(el("h2", {}, "Top-activating contexts"));
  if (n.contexts.length) {
    const max = Math.max(1e-12, ...n.contexts.map((c) => c.activation || 0));
    n.contexts.forEach((c) => panel.append(el("div", { class: "window context" },
      el("div", { class: "note" }, `#${c.rank + 1} · activation ${LM.fmt(c.activation)}`),
      LM.heatTokens(c.tokens, c.values, { max, mark: c.peak, label: "activation" }))));
    panel.append(el("p", { class: "note" }, "Background: the neuron's activation on each token (to about 1% of " +
      "its peak); the outlined token is the peak."));
  } else if (n.context_texts.length) {
    n.context_texts.forEach((t) => panel.append(el("div", { class: "window tokens context" }, t)));
    panel.append(el("p", { class: "note" }, "Build the neuron_contexts stage for per-token activations."));
  } else {
    panel.append(el("p", { class: "note" }, "This atlas has no activation statistics."));
  }
}
