// Circuits: a task's circuit as a graph (SVG): embed at the bottom, a row per layer, logits on top; edge width
// and colour by score (blue raises the task's logit difference, red lowers it); a top-k slider; the faithfulness curve.
// Every circuit names its granularity (edges: each edge patched; nodes: the touched nodes run whole) and shows the
// verification of its top edges by exact edge patching. Dictionary latents (L5.resid.post.F12) and error nodes
// (L5.resid.post.E) are nodes of their layer's row, drawn F12 / E, each latent linked to its feature page.
"use strict";

const ROW_H = 74, COL_W = 86, MARGIN = 46, NODE_W = 70, NODE_H = 24;

(async function () {
  const page = document.getElementById("page");
  await LM.header("circuit");
  if (document.getElementById("page-error")) return;
  const { el } = LM;
  const params = new URLSearchParams(location.search);
  const task = params.get("task") || "ioi";
  const tasks = await LM.api("/api/circuit/tasks");
  const picker = el("select", { id: "task", "aria-label": "task", onchange: () => {
    location.href = `/circuit?task=${encodeURIComponent(picker.value)}`;
  } }, tasks.tasks.map((t) => el("option", { value: t, selected: t === task || null }, t)));
  const storedNote = tasks.stored.length ? el("span", { id: "circuit-stored" }, "The atlas holds circuits for ",
    ...tasks.stored.flatMap((s, i) => [i ? ", " : "", el("a", { href: `/circuit?${new URLSearchParams({ task: s.task,
      method: s.method, source: "atlas" })}` }, `${s.task} (${s.method}, ${s.granularity}, ${s.edges} edges)`)]), ".")
    : "The atlas holds no circuit (lmatlas circuit MODEL --task T --atlas FILE stores one).";
  const status = el("p", { class: "note", id: "circuit-status" }, tasks.live ? "computing…" : "");
  const panel = el("section", { class: "panel", id: "circuit-panel" });
  page.append(el("h1", {}, "Circuit of a task"),
    el("div", { class: "controls" }, el("label", {}, "task ", picker),
      el("span", { class: "note" }, storedNote, tasks.live ? " Others are computed with the live model." : "")),
    status, panel);
  const query = new URLSearchParams({ task });
  for (const key of ["source", "method", "n", "seed", "steps", "along", "qk", "verify", "faithfulness", "granularity", "top"]) {
    if (params.has(key)) query.set(key, params.get(key));
  }
  const started = performance.now();
  const data = await LM.api(`/api/circuit?${query}`).catch((error) => {
    status.textContent = "";
    LM.fail(panel, error);
    return null;
  });
  if (data) {
    status.replaceChildren(describe(data, Math.round(performance.now() - started), tasks.live, task));
    drawCircuit(panel, data);
  }
  LM.ready();
})().catch((error) => LM.fail(document.getElementById("page"), error));

// Where the circuit came from, and its summary numbers.
function describe(data, ms, live, task) {
  const { el } = LM;
  const where = data.computed === "live"
    ? `Computed live on the attached model in ${ms} ms: ${data.params.prompts} prompt pairs (seed ${data.params.seed}), ` +
      `${data.method}${data.params.steps ? ` with ${data.params.steps} steps` : ""}, smallest circuit reaching ` +
      `faithfulness ${data.params.target}.`
    : `Read from the atlas (circuits table, ${data.method}).`;
  const run = data.granularity === "edges"
    ? "run edge by edge (each input reads only its in-circuit sources)"
    : "run as nodes (the heads and MLPs the edges touch run whole: an edge they carry may be missing from the list)";
  const other = data.granularity === "edges" ? "nodes" : "edges";
  return el("span", { id: "circuit-source", "data-computed": data.computed, "data-granularity": data.granularity },
    where, " ",
    data.computed === "atlas" && live ? el("a", { href: `/circuit?task=${task}&source=live` }, "compute it live") : null,
    el("br"), el("span", { id: "circuit-granularity" }, `Faithfulness ${run}. `),
    live ? el("a", { href: `/circuit?task=${task}&source=live&granularity=${other}` }, `run it as ${other}`) : null,
    el("br"), `${data.circuit_edges} edges · ${data.circuit_nodes.length} nodes · faithfulness ` +
    `${LM.fmt(data.faithfulness)} (${data.granularity})` +
    (data.cpr === null ? "" : ` · CPR ${LM.fmt(data.cpr)} · CMD ${LM.fmt(data.cmd)}`) +
    (data.clean === null ? "" : ` · logit difference clean ${LM.fmt(data.clean)}, corrupt ${LM.fmt(data.corrupt)}`),
    el("br"), el("span", { id: "circuit-verification" }, verificationLine(data.verification)),
    data.features.length ? el("br") : null, data.features.length ? featuresLine(data.features) : null);
}

// Which dictionaries' latents are nodes, and what their error nodes stand for.
function featuresLine(features) {
  const { el } = LM;
  return el("span", { id: "circuit-features" }, "Feature nodes: " + features.map((f) =>
    `${f.latents.length} latents of the dictionary at ${f.site} (${f.site}.F<i>) and its error node ${f.error}`)
    .join("; ") + ". An error node writes what the listed latents leave unexplained.");
}

// The text drawn in a node's box: a latent as F12, an error node as E (the full name is in its title).
function shortName(node) {
  return node.kind === "feature" ? `F${node.index}` : node.kind === "error" ? "E" : node.name;
}

// The agreement of the edge scores with exact edge patching.
function verificationLine(check) {
  if (!check) return "No verification of the edge scores recorded.";
  const count = check.edges === null ? "The top edges" : `The top ${check.edges} edges`;
  return `${count} re-measured by exact edge patching: Spearman ${LM.fmt(check.spearman)}, largest error ` +
    `${LM.fmt(check.max_abs_error)}` + (check.gap === null ? "." : ` (gap ${LM.fmt(check.gap)}).`);
}

// Node positions: one row per layer (embed below, logits above), nodes left to right in the order given.
function placeNodes(nodes) {
  const rows = new Map();
  nodes.forEach((n) => { if (!rows.has(n.layer)) rows.set(n.layer, []); rows.get(n.layer).push(n); });
  const layers = [...rows.keys()].sort((a, b) => a - b);
  const width = 2 * MARGIN + COL_W * Math.max(...[...rows.values()].map((r) => r.length));
  const height = 2 * MARGIN + ROW_H * (layers.length - 1);
  const at = new Map();
  layers.forEach((layer, r) => rows.get(layer).forEach((n, i) => {
    const count = rows.get(layer).length;
    at.set(n.name, { x: width / 2 + (i - (count - 1) / 2) * COL_W, y: height - MARGIN - r * ROW_H });
  }));
  return { at, width, height, layers: layers.map((layer, r) => ({ layer, y: height - MARGIN - r * ROW_H })) };
}

function edgePath(a, b) {
  if (Math.abs(a.y - b.y) < 1) {  // same row (a head into its own layer's MLP): bulge upwards
    return `M${a.x},${a.y - NODE_H / 2} C${a.x},${a.y - ROW_H / 2} ${b.x},${b.y - ROW_H / 2} ${b.x},${b.y - NODE_H / 2}`;
  }
  const [y1, y2] = [a.y - NODE_H / 2, b.y + NODE_H / 2];
  return `M${a.x},${y1} C${a.x},${(y1 + y2) / 2} ${b.x},${(y1 + y2) / 2} ${b.x},${y2}`;
}

function drawCircuit(panel, data) {
  const { el, svg } = LM;
  const hover = el("div", { id: "circuit-hover", class: "note" }, "Hover an edge or a node for its scores.");
  const chosen = el("div", { id: "circuit-node" });
  const { at, width, height, layers } = placeNodes(data.nodes);
  const biggest = Math.max(1e-12, ...data.edges.map((e) => Math.abs(e.score)));
  const graph = svg("svg", { id: "circuit-svg", width, height, viewBox: `0 0 ${width} ${height}`,
    "data-nodes": data.nodes.length, "data-edges": data.edges.length });
  layers.forEach(({ layer, y }) => graph.append(svg("text", { x: 6, y: y + 4, class: "row-label" },
    layer < 0 ? "embed" : layer >= data.layers ? "logits" : `L${layer}`)));
  const edgeGroup = svg("g", { id: "circuit-edges" });
  const lines = data.edges.map((e, i) => {
    const path = svg("path", { d: edgePath(at.get(e.source), at.get(e.node)), class: "edge" + (e.in_circuit ? " in" : ""),
      "data-i": i, fill: "none", stroke: e.score >= 0 ? "#2563eb" : "#dc2626",
      "stroke-width": (0.8 + 6 * Math.abs(e.score) / biggest).toFixed(2) },
    svg("title", {}, `${e.source} → ${e.target}: ${LM.fmt(e.score, 4)}`));
    path.addEventListener("mouseenter", () => {
      hover.textContent = `${e.source} → ${e.target}: score ${LM.fmt(e.score, 4)} (rank ${i + 1}` +
        `${e.in_circuit ? ", in the circuit" : ", outside the circuit"})`;
    });
    edgeGroup.append(path);
    return path;
  });
  graph.append(edgeGroup);
  const boxes = data.nodes.map((n) => {
    const { x, y } = at.get(n.name);
    const box = svg("g", { class: `node ${n.kind}` + (n.in_circuit ? " in" : ""), "data-name": n.name,
      transform: `translate(${x - NODE_W / 2},${y - NODE_H / 2})` },
    svg("rect", { width: NODE_W, height: NODE_H, rx: 5 }),
    svg("text", { x: NODE_W / 2, y: NODE_H / 2 + 4, "text-anchor": "middle" }, shortName(n)),
    svg("title", {}, n.summary ? `${n.name}: ${n.summary}` : n.name));
    box.addEventListener("mouseenter", () => { hover.textContent = nodeSummary(n, data.edges, slider.value); });
    box.addEventListener("click", () => chosen.replaceChildren(nodeDetail(n)));
    graph.append(box);
    return box;
  });
  const label = el("span", { id: "top-k-label" });
  const slider = el("input", { type: "range", id: "top-k", min: 1, max: data.edges.length,
    value: Math.max(1, data.circuit_edges), "aria-label": "edges shown" });
  const show = () => {
    const k = Number(slider.value);
    lines.forEach((line, i) => line.classList.toggle("hidden", i >= k));
    const touched = new Set(data.edges.slice(0, k).flatMap((e) => [e.source, e.node]));
    boxes.forEach((box, i) => box.classList.toggle("dim", !touched.has(data.nodes[i].name)));
    graph.dataset.shown = k;
    label.textContent = `${k} of ${data.edges.length} edges shown (the circuit: the first ${data.circuit_edges}); ` +
      `smallest |score| shown ${LM.fmt(Math.abs(data.edges[k - 1].score), 4)}`;
  };
  slider.addEventListener("input", show);
  const curve = el("section", { class: "panel", id: "curve" }, el("h2", {}, "Faithfulness by edges kept"));
  drawCurve(curve, data);
  panel.append(el("div", { class: "controls" }, el("label", {}, "top edges ", slider), label), hover,
    el("div", { class: "scroll graph" }, graph), chosen,
    el("p", { class: "note" }, "Blue edges raise the task's logit difference, red ones lower it; width is |score|. " +
      "Outlined nodes belong to the circuit. An edge into a head ends at its queries; into L5.KV1, at the keys or " +
      "values of KV group 1. Click a node for its page."));
  panel.after(curve);
  show();
}

function nodeSummary(node, edges, k) {
  const shown = edges.slice(0, Number(k));
  const into = shown.filter((e) => e.node === node.name), out = shown.filter((e) => e.source === node.name);
  const total = (list) => LM.fmt(list.reduce((s, e) => s + e.score, 0), 4);
  return `${node.name} (${node.kind}${node.in_circuit ? ", in the circuit" : ""}): ${into.length} edges in ` +
    `(sum ${total(into)}), ${out.length} edges out (sum ${total(out)})`;
}

function nodeDetail(node) {
  const { el } = LM;
  const links = [];
  if (node.kind === "head") {
    const name = node.name;
    links.push(el("a", { href: LM.headUrl(name) }, `head page of ${name}`), " · ",
      LM.editLink(`ablate ${name} in the edit playground`, "ablate", name));
    return el("div", {}, el("p", { class: "note", id: "circuit-node-links" }, ...links), explainPanel(name));
  } else if (node.kind === "kv") {
    const group = LM.info.model.query_heads / LM.info.model.kv_heads;
    for (let h = node.index * group; h < (node.index + 1) * group; h++) {
      links.push(el("a", { href: LM.headUrl(`L${node.layer}.H${h}`) }, `L${node.layer}.H${h}`), " ");
    }
    links.unshift(`query heads sharing KV group ${node.index}: `);
  } else if (node.kind === "feature") {
    links.push(el("a", { href: `/feature/${node.name}` }, `feature page of ${node.name}`),
      node.summary ? ` (${node.summary})` : "");
  } else if (node.kind === "error") {
    links.push(`${node.name}: the error node of the dictionary at ${node.site}, what its listed latents ` +
      "leave unexplained (the reconstruction error and every latent not in the graph).");
  } else {
    links.push(`${node.name} has no page of its own.`);
  }
  return el("p", { class: "note", id: "circuit-node-links" }, ...links);
}

// The faithfulness curve: x = fraction of edges kept (log scale), y = faithfulness; the target dashed.
function drawCurve(panel, data) {
  const { el, svg } = LM;
  if (!data.curve.length) {
    panel.append(el("p", { class: "note", id: "no-curve" }, "The atlas keeps a circuit's edges and faithfulness, not its " +
      "curve: compute the circuit live to see it."));
    return;
  }
  const W = 520, H = 220, P = 36;
  const xs = data.curve.map((c) => Math.log10(c.fraction));
  const ys = data.curve.map((c) => c.faithfulness ?? 0);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(0, ...ys), Math.max(1.05, ...ys)];
  const sx = (x) => P + (W - 2 * P) * (x - x0) / Math.max(1e-9, x1 - x0);
  const sy = (y) => H - P - (H - 2 * P) * (y - y0) / (y1 - y0);
  const chart = svg("svg", { id: "curve-svg", width: W, height: H },
    svg("line", { x1: P, x2: W - P, y1: sy(0), y2: sy(0), stroke: "#bbb" }),
    svg("line", { x1: P, x2: W - P, y1: sy(data.params.target), y2: sy(data.params.target), stroke: "#e8590c",
      "stroke-dasharray": "4 3" }),
    svg("polyline", { points: xs.map((x, i) => `${sx(x)},${sy(ys[i])}`).join(" "), fill: "none", stroke: "#2f5fd0",
      "stroke-width": 2 }),
    data.curve.map((c, i) => svg("circle", { cx: sx(xs[i]), cy: sy(ys[i]), r: 3.5, fill: "#2f5fd0", class: "point" },
      svg("title", {}, `${LM.fmt(100 * c.fraction, 1)}% of edges (${c.edges} edges, ${c.nodes} nodes): ` +
        `faithfulness ${LM.fmt(c.faithfulness)}`))),
    svg("text", { x: W / 2, y: H - 6, "text-anchor": "middle" }, "fraction of edges kept (log scale)"),
    svg("text", { x: P, y: H - P + 14, "text-anchor": "middle" }, `${LM.fmt(100 * data.curve[0].fraction, 1)}%`),
    svg("text", { x: W - P, y: H - P + 14, "text-anchor": "middle" }, "100%"),
    svg("text", { x: 4, y: sy(1) + 4 }, "1"), svg("text", { x: 4, y: sy(0) + 4 }, "0"));
  panel.append(chart, el("p", { class: "note" }, `Dashed: the target ${data.params.target}. CPR (area under the curve) ` +
    `${LM.fmt(data.cpr)}, CMD (area under |1 − faithfulness|) ${LM.fmt(data.cmd)}.`));
}
