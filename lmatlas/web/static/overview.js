// Overview: the layers x heads grid by type, a scatter of any two head metrics, layers, neurons per layer.
"use strict";

(async function () {
  const page = document.getElementById("page");
  await LM.header("overview");
  const { el } = LM;
  const gridPanel = el("section", { class: "panel", id: "heads" });
  const scatterPanel = el("section", { class: "panel", id: "scatter-panel" });
  const layersPanel = el("section", { class: "panel", id: "layers" });
  const neuronsPanel = el("section", { class: "panel", id: "neurons" });
  page.append(el("h1", {}, `Atlas of ${LM.info.model.source}`),
              el("div", { class: "row" }, gridPanel, scatterPanel), el("div", { class: "row" }, layersPanel, neuronsPanel));
  const [grid, layers] = await Promise.all([LM.api("/api/heads"), LM.api("/api/layers")]);
  drawGrid(gridPanel, grid);
  drawScatter(scatterPanel, grid);
  drawLayers(layersPanel, layers);
  await drawNeurons(neuronsPanel, LM.info.model.layers);
  LM.ready();
})().catch((error) => LM.fail(document.getElementById("page"), error));

function metricOf(cell, metric) {
  if (metric.endsWith(".score")) return cell.scores[metric.slice(0, -6)];
  if (metric.endsWith(".z")) return cell.z[metric.slice(0, -2)];
  return cell[metric];
}

function drawGrid(panel, grid) {
  const { el } = LM;
  const shown = new Set(grid.types);
  const counts = {};
  grid.cells.forEach((c) => c.labels.forEach((t) => { counts[t] = (counts[t] || 0) + 1; }));
  const info = el("div", { id: "hover-info", class: "note" }, "Hover a head; click to open it.");
  const colourBy = el("select", { id: "colour-by" },
    el("option", { value: "type" }, "colour: head type"),
    ["importance", "copying", "suppression"].map((m) => el("option", { value: m }, `colour: ${m}`)));
  const legend = el("div", { class: "legend", id: "legend" });
  grid.types.forEach((type) => {
    const box = el("input", { type: "checkbox", checked: true, "data-type": type, onchange: () => {
      box.checked ? shown.add(type) : shown.delete(type);
      paint();
    } });
    legend.append(el("label", { title: `${counts[type] || 0} heads labelled ${type}` }, box,
      el("span", { class: "sw", style: `background:${LM.typeColour(type)}` }), `${type} (${counts[type] || 0})`));
  });
  legend.append(el("label", {}, el("span", { class: "sw", style: `background:${LM.NO_TYPE}` }), "no label"));
  const onlyLabelled = el("input", { type: "checkbox", id: "only-labelled", onchange: () => paint() });
  const box = el("div", { id: "grid", style: `grid-template-columns: 34px repeat(${grid.heads}, minmax(14px, 1fr))` });
  box.append(el("span", {}));
  for (let h = 0; h < grid.heads; h++) box.append(el("span", { class: "colhead" }, `H${h}`));
  const cells = [];
  grid.cells.forEach((cell) => {
    if (cell.head === 0) box.append(el("span", { class: "lab" }, `L${cell.layer}`));
    const link = el("a", { class: "cell", href: LM.headUrl(cell.name), "data-name": cell.name,
      onmouseenter: () => {
        info.textContent = `${cell.name} · ${cell.labels.join(", ") || "no label"} · importance ` +
          `${LM.fmt(cell.importance)} · copying ${LM.fmt(cell.copying)}`;
      } });
    link.title = `${cell.name}: ${cell.labels.join(", ") || "no label"}`;
    cells.push([cell, link]);
    box.append(link);
  });
  function paint() {
    const by = colourBy.value;
    const values = grid.cells.map((c) => c[by]).filter((v) => typeof v === "number");
    const max = Math.max(1e-12, ...values.map(Math.abs));
    for (const [cell, link] of cells) {
      const visible = (cell.labels.length === 0 ? !onlyLabelled.checked : cell.labels.some((t) => shown.has(t)));
      link.classList.toggle("off", !visible);
      const type = shown.has(cell.type) ? cell.type : cell.labels.find((t) => shown.has(t));
      link.style.background = by === "type" ? LM.typeColour(type) : LM.heat((cell[by] || 0) / max);
    }
  }
  colourBy.addEventListener("change", paint);
  paint();
  panel.append(el("h2", {}, `Heads: ${grid.layers} layers × ${grid.heads} heads`),
    el("div", { class: "controls" }, colourBy, el("label", {}, onlyLabelled, " labelled heads only")),
    legend, box, info);
}

function drawScatter(panel, grid) {
  const { el } = LM;
  const pick = (id, chosen) => el("select", { id }, grid.metrics.map((m) =>
    el("option", { value: m, selected: m === chosen }, m)));
  const xs = pick("scatter-x", "importance");
  const ys = pick("scatter-y", grid.metrics.includes("induction.score") ? "induction.score" : "copying");
  const holder = el("div", { id: "scatter" });
  panel.append(el("h2", {}, "Head metrics"), el("div", { class: "controls" }, "x", xs, "y", ys), holder);
  const ns = "http://www.w3.org/2000/svg";
  const svgEl = (tag, attrs) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  };
  function draw() {
    const W = 480, H = 330, L = 62, B = 40, T = 22, R = 12;  // plot area: [L, W - R] x [T, H - B]
    const points = grid.cells.map((c) => [c, metricOf(c, xs.value), metricOf(c, ys.value)])
      .filter(([, x, y]) => typeof x === "number" && typeof y === "number");
    const svg = svgEl("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
    if (!points.length) {
      holder.replaceChildren(el("p", { class: "note" }, "No head has both metrics in this atlas."));
      return;
    }
    const ext = (i) => {
      let lo = Math.min(...points.map((p) => p[i])), hi = Math.max(...points.map((p) => p[i]));
      if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
      return [lo, hi];
    };
    const [x0, x1] = ext(1), [y0, y1] = ext(2);
    const sx = (v) => L + (v - x0) / (x1 - x0) * (W - L - R), sy = (v) => H - B - (v - y0) / (y1 - y0) * (H - B - T);
    svg.append(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#ccc" }),
               svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#ccc" }));
    const label = (x, y, text, anchor = "middle") => {
      const t = svgEl("text", { x, y, "text-anchor": anchor });
      t.textContent = text;
      svg.append(t);
    };
    label(L, H - B + 14, LM.fmt(x0), "start"); label(W - R, H - B + 14, LM.fmt(x1), "end");
    label(L - 4, H - B, LM.fmt(y0), "end"); label(L - 4, T + 8, LM.fmt(y1), "end");
    label((W + L) / 2, H - 6, xs.value); label(L, 12, `↑ ${ys.value}`, "start");
    for (const [cell, x, y] of points) {
      const dot = svgEl("circle", { cx: sx(x), cy: sy(y), r: 4.5, fill: LM.typeColour(cell.type),
        stroke: "#333", "stroke-width": 0.4, "data-name": cell.name, style: "cursor:pointer" });
      const title = svgEl("title", {});
      title.textContent = `${cell.name} (${cell.labels.join(", ") || "no label"}): ${LM.fmt(x)}, ${LM.fmt(y)}`;
      dot.append(title);
      dot.addEventListener("click", () => { location.href = LM.headUrl(cell.name); });
      svg.append(dot);
    }
    holder.replaceChildren(svg);
  }
  xs.addEventListener("change", draw);
  ys.addEventListener("change", draw);
  draw();
}

function drawLayers(panel, layers) {
  const { el } = LM;
  const maxMlp = Math.max(1e-12, ...layers.map((l) => Math.abs(l.mlp_delta_loss || 0)));
  const rows = layers.map((l) => el("tr", {},
    el("td", {}, `L${l.layer}`),
    el("td", { class: "num" }, LM.fmt(l.lens_entropy, 2)),
    el("td", { class: "num" }, LM.fmt(l.lens_final_prob)),
    el("td", { class: "num" }, LM.fmt(l.lens_top1_agreement, 2)),
    el("td", { class: "num" }, LM.fmt(l.lens_kl_to_final, 2)),
    el("td", { class: "num" }, LM.fmt(l.mlp_delta_loss), " ", LM.bar(l.mlp_delta_loss, maxMlp, 50)),
    el("td", { class: "num" }, LM.fmt(l.max_head_importance)),
    el("td", { class: "num" }, l.labelled_heads)));
  panel.append(el("h2", {}, "Layers"), el("div", { class: "scroll" }, el("table", { id: "layer-table" },
    el("tr", {}, ["layer", "lens entropy", "p(final)", "top-1 agrees", "KL to final", "MLP importance",
                  "max head imp.", "labelled heads"].map((h, i) => el("th", { class: i ? "num" : null }, h))),
    rows)),
    el("p", { class: "note" }, "Logit lens averaged over the corpus; importance = loss increase (nats) when " +
      "mean-ablated."));
}

function drawNeurons(panel, nLayers) {
  const { el } = LM;
  const layer = el("select", { id: "neuron-layer" },
    Array.from({ length: nLayers }, (_, i) => el("option", { value: i }, `layer ${i}`)));
  const sort = el("select", { id: "neuron-sort" }, [["top_logit", "top promoted logit"], ["max", "max activation"],
    ["frac_active", "activation density"], ["mean", "mean activation"], ["index", "index"]]
    .map(([v, t]) => el("option", { value: v }, `by ${t}`)));
  const body = el("div", { class: "scroll" });
  const more = el("span", { class: "note" });
  let offset = 0;
  const prev = el("button", { class: "plain", onclick: () => { offset = Math.max(0, offset - 50); load(); } }, "◀");
  const next = el("button", { class: "plain", onclick: () => { offset += 50; load(); } }, "▶");
  async function load() {
    try {
      const data = await LM.api(`/api/neurons?layer=${layer.value}&sort=${sort.value}&offset=${offset}&limit=50`);
      more.textContent = `${offset + 1}–${offset + data.neurons.length} of ${data.total}`;
      prev.disabled = offset === 0;
      next.disabled = offset + data.neurons.length >= data.total;
      body.replaceChildren(el("table", { id: "neuron-table" },
        el("tr", {}, ["neuron", "promotes", "top logit", "max act.", "density"].map((h, i) =>
          el("th", { class: i > 1 ? "num" : null }, h))),
        data.neurons.map((n) => el("tr", {},
          el("td", {}, el("a", { href: LM.neuronUrl(n.name), class: "neuron-link" }, n.name)),
          el("td", {}, n.promoted.map((t) => LM.tokenLink(t))),
          el("td", { class: "num" }, LM.fmt(n.top_logit, 2)),
          el("td", { class: "num" }, LM.fmt(n.max, 2)),
          el("td", { class: "num" }, LM.fmt(n.frac_active, 2))))));
    } catch (error) {
      LM.fail(body, error);
    }
  }
  layer.addEventListener("change", () => { offset = 0; load(); });
  sort.addEventListener("change", () => { offset = 0; load(); });
  panel.append(el("h2", {}, "Neurons"), el("div", { class: "controls" }, layer, sort, prev, next, more), body);
  return load();
}
