// Head page: detector scores vs null, OV pairs, importance, strongest corpus windows, live attention.
"use strict";

(async function () {
  const page = document.getElementById("page");
  await LM.header("head");
  if (document.getElementById("page-error")) return;
  const name = decodeURIComponent(location.pathname.split("/").pop());
  const { el } = LM;
  const [head, windows] = await Promise.all([LM.api(`/api/heads/${name}`), LM.api(`/api/heads/${name}/windows`)]);
  document.title = `lmatlas · ${name}`;
  const imp = head.importance;
  page.append(el("h1", { id: "head-title" }, `Head ${name} `,
    head.labels.map((t) => el("span", { class: "chip", style: `background:${LM.typeColour(t)}`,
      title: (head.scores.find((s) => s.detector === t) || {}).description || t }, t)),
    head.labels.length ? null : el("span", { class: "muted", style: "font-size:14px" }, "no label")),
  labelLine(head.explanation),
  el("p", { class: "muted" }, `layer ${head.layer} · query head ${head.head} · KV group ${LM.fmt(head.kv_group)}` +
    (imp ? ` · importance ${LM.fmt(imp.delta_loss)} nats (rank ${imp.rank} of ${imp.of})` : ""),
    " · ", el("a", { href: LM.headUrl(`L${head.layer}.H${(head.head + 1) % LM.info.model.query_heads}`) }, "next head"),
    LM.info.available.model ? [" · ", LM.editLink("add to edit: ablate", "ablate", name), " · ",
      LM.editLink("scale ×0.5", "scale", name, 0.5)] : null));

  const scores = el("section", { class: "panel", id: "scores" });
  const ov = el("section", { class: "panel", id: "ov" });
  const win = el("section", { class: "panel", id: "windows" });
  const related = el("section", { class: "panel", id: "related" });
  const live = el("section", { class: "panel", id: "live" });
  page.append(el("div", { class: "row" }, scores, ov), win, el("div", { class: "row" }, related, live));
  drawScores(scores, head);
  drawOV(ov, head);
  drawWindows(win, windows);
  drawRelated(related, head);
  live.append(el("h2", {}, "Attention on your text"));
  LM.livePane(live, { placeholder: "Type a prompt (up to " + LM.info.limits.prompt_tokens + " tokens)…",
    run: (prompt, out) => runAttention(name, prompt, out) });
  if (LM.info.available.model) page.append(explainPanel(name));  // attention_sources.js
  LM.ready();
})().catch((error) => LM.fail(document.getElementById("page"), error));

// The unit's label (stage labels): its sentence, or "no label" without the stage.
function labelLine(explanation) {
  const { el } = LM;
  if (!explanation) return el("p", { class: "muted", id: "label-sentence" }, "no label (the atlas has no stage labels)");
  return el("p", { id: "label-sentence", class: explanation.labelled ? "label" : "muted",
    title: "rule fitted on fit windows, scored on held-out windows against nulls (lmatlas explain)" },
  explanation.sentence);
}

function decision(s) {
  if (s.label) return LM.el("span", { class: "yes" }, "✓ labelled");
  const why = [];
  if (s.threshold !== null && (s.score === null || s.score < s.threshold)) why.push(`score < ${s.threshold}`);
  if (s.min_z !== null && (s.z === null || s.z < s.min_z)) why.push(`z < ${s.min_z}`);
  return LM.el("span", { class: "no" }, "✗ " + (why.join(", ") || "not labelled"));
}

function drawScores(panel, head) {
  const { el } = LM;
  panel.append(el("h2", {}, "Detectors: score against the null battery"));
  if (!head.scores.length) {
    panel.append(el("p", { class: "note" }, "This atlas has no census (build it with lmatlas map --only census)."));
    return;
  }
  panel.append(el("table", { id: "score-table" },
    el("tr", {}, ["detector", "score", "null", "", "z", "needs", "decision"].map((h, i) =>
      el("th", { class: i && i < 6 ? "num" : null }, h))),
    head.scores.map((s) => el("tr", { title: s.description },
      el("td", {}, el("span", { class: "sw", style: `display:inline-block;width:10px;height:10px;margin-right:5px;` +
        `background:${LM.typeColour(s.detector)}` }), s.detector),
      el("td", { class: "num" }, LM.fmt(s.score)),
      el("td", { class: "num" }, LM.fmt(s.baseline)),
      el("td", {}, LM.bar(s.score, 1, 60), el("br"), el("span", { class: "bar", style:
        `width:${Math.max(1, Math.round(60 * Math.min(1, s.baseline || 0)))}px;background:#bbb` })),
      el("td", { class: "num" }, LM.fmt(s.z, 1)),
      el("td", { class: "num" }, `≥${LM.fmt(s.threshold, 2)}` + (s.min_z === null ? "" : `, z≥${LM.fmt(s.min_z, 1)}`)),
      el("td", {}, decision(s))))),
  el("h3", {}, "What each label means"),
  el("dl", { id: "label-meanings" }, head.scores.flatMap((s) => [
    el("dt", {}, el("span", { class: "chip", style: `background:${LM.typeColour(s.detector)}` }, s.detector),
      s.label ? el("span", { class: "yes" }, " this head") : null),
    el("dd", {}, s.description || "(a detector this version of lmatlas does not know)",
      el("span", { class: "note" }, ` · labelled when score ≥ ${LM.fmt(s.threshold, 2)}` +
        (s.min_z === null ? "" : ` and z ≥ ${LM.fmt(s.min_z, 1)} against the null battery`)))])));
}

function drawOV(panel, head) {
  const { el } = LM;
  panel.append(el("h2", {}, "OV circuit: what the head writes"));
  if (!head.ov) {
    panel.append(el("p", { class: "note" }, "This atlas has no OV decoding (lmatlas map --only ov)."));
    return;
  }
  const max = Math.max(1e-12, ...head.ov.pairs.map((p) => Math.abs(p.logit || 0)));
  panel.append(el("p", {}, `copying score ${LM.fmt(head.ov.copying)} · suppression score ${LM.fmt(head.ov.suppression)}`),
    el("table", { id: "ov-table" }, el("tr", {}, el("th", {}, "source"), el("th", {}, "→ output"),
      el("th", { class: "num" }, "logit")),
      head.ov.pairs.map((p) => el("tr", {}, el("td", {}, LM.tokenLink(p.source)), el("td", {}, LM.tokenLink(p.output)),
        el("td", { class: "num" }, LM.fmt(p.logit, 2), " ", LM.bar(p.logit, max, 50))))));
}

function drawWindows(panel, data) {
  const { el } = LM;
  panel.append(el("h2", {}, "Where it writes most in the corpus"),
    el("p", { class: "note" }, "Each window ends at the query position where the head's write to the residual " +
      "stream is largest (outlined); each token's background is the head's attention from that query."));
  if (!data.available) {
    panel.append(el("p", { class: "note" }, "Build the head_windows and corpus stages to see them " +
      "(lmatlas map --only corpus,head_windows)."));
    return;
  }
  data.windows.forEach((w) => {
    const max = Math.max(1e-12, ...w.attention.map((v) => v || 0));
    panel.append(el("div", { class: "window" },
      el("div", { class: "note" }, `window ${w.window_id}, query position ${w.query_pos} · write norm ` +
        `${LM.fmt(w.write_norm)} · top attention ${LM.fmt(max)}`),
      LM.heatTokens(w.tokens, w.attention, { max, mark: w.tokens.length - 1, after: w.after, label: "attention" })));
  });
}

async function drawRelated(panel, head) {
  const { el } = LM;
  panel.append(el("h2", {}, "Neurons writing what this head writes"));
  const outputs = head.ov ? [...new Set(head.ov.pairs.map((p) => p.output))].slice(0, 3) : [];
  if (!outputs.length) {
    panel.append(el("p", { class: "note" }, "No OV outputs in this atlas."));
    return;
  }
  for (const token of outputs) {
    const found = await LM.api(`/api/search?q=${encodeURIComponent(token)}&limit=30`);
    const neurons = found.results.filter((r) => r.kind === "neuron").slice(0, 8);
    panel.append(el("div", { class: "window" }, LM.tokenLink(token), " ",
      neurons.length ? neurons.map((r) => el("a", { href: LM.neuronUrl(r.name), class: "tok neuron-link" }, r.name))
        : el("span", { class: "note" }, "no neuron has it among its top tokens")));
  }
}

async function runAttention(name, prompt, out) {
  const data = await LM.api(`/api/heads/${name}/attention`, { prompt });
  const tri = Attention.decode(data.data);
  const canvasBox = LM.el("div", { id: "attention-box" });
  const text = LM.el("div", { id: "attention-text" });
  out.replaceChildren(canvasBox, LM.el("h2", { style: "margin-top:12px" }, "On the text"), text);
  const showQuery = (i) => {
    const values = data.tokens.map((_, j) => Attention.at(tri, i, j));
    text.replaceChildren(LM.el("p", { class: "note" }, `attention from query ${i} ${JSON.stringify(data.tokens[i])}; ` +
      "hover a token to make it the query"), LM.heatTokens(data.tokens, values, { mark: i, label: "attention", max: 1 }));
    text.querySelectorAll(".tokens span").forEach((span) => span.addEventListener("mouseenter", () => {
      const q = Number(span.dataset.i);
      text.querySelectorAll(".tokens span").forEach((s) => {
        const j = Number(s.dataset.i);
        s.style.background = LM.heat(Attention.at(tri, q, j));
        s.classList.toggle("q", j === q);
      });
    }));
  };
  await Attention.draw(canvasBox, data.tokens, tri, { onQuery: showQuery });
  showQuery(data.tokens.length - 1);
}
