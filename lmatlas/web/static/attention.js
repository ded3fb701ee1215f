// An attention pattern on a canvas: [n, n] probabilities drawn as pixels, usable at thousands of tokens.
//
// The server sends the lower triangle as uint16 (p * 65535). Drawing never makes one element per
// cell: the pattern is max-pooled to at most MAX_SIDE pixels a side (so a sharp, sparse attention
// stays visible) and painted with putImageData, a band of rows per animation frame, so the page
// keeps responding while a 2,048-token pattern is drawn. Hovering shows query, key and value.
"use strict";

const Attention = {};
Attention.MAX_SIDE = 1024;
Attention.ROWS_PER_FRAME = 96;

// base64 -> Float32Array of the lower triangle (row i: keys 0..i).
Attention.decode = function (data) {
  const text = atob(data);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  const fixed = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
  const out = new Float32Array(fixed.length);
  for (let i = 0; i < fixed.length; i++) out[i] = fixed[i] / 65535;
  return out;
};

// p(query i -> key j) from the packed lower triangle.
Attention.at = (tri, i, j) => (j > i ? 0 : tri[i * (i + 1) / 2 + j]);

// Colour map: sqrt to lift small weights, white -> dark blue.
Attention.colour = function (p) {
  const t = Math.sqrt(Math.max(0, Math.min(1, p)));
  return [255 - 220 * t, 255 - 190 * t, 255 - 90 * t];
};

// Draw into `container`; returns a promise resolved when every band is painted.
// options.onQuery(i) is called when a row is clicked (to show that query's attention on the tokens).
Attention.draw = function (container, tokens, tri, options = {}) {
  const n = tokens.length;
  const bin = Math.max(1, Math.ceil(n / Attention.MAX_SIDE));
  const side = Math.ceil(n / bin);
  const zoom = Math.max(1, Math.floor(Math.min(640, Attention.MAX_SIDE) / side));
  const canvas = document.createElement("canvas");
  canvas.className = "heat";
  canvas.id = options.id || "attention-canvas";
  canvas.width = side;
  canvas.height = side;
  canvas.style.width = `${side * zoom}px`;
  canvas.dataset.tokens = n;
  canvas.dataset.bin = bin;
  const info = document.createElement("div");
  info.className = "note";
  info.id = "attention-hover";
  info.textContent = `${n} tokens` + (bin > 1 ? ` · each pixel is the max over ${bin}×${bin} cells` : "") +
    " · hover for values, click a row to show that query on the text";
  container.replaceChildren(info, canvas);
  const ctx = canvas.getContext("2d");
  const position = (event) => {
    const rect = canvas.getBoundingClientRect();
    const x = Math.floor((event.clientX - rect.left) / rect.width * side);
    const y = Math.floor((event.clientY - rect.top) / rect.height * side);
    return [Math.min(n - 1, y * bin), Math.min(n - 1, x * bin)];
  };
  canvas.addEventListener("mousemove", (event) => {
    const [i, j] = position(event);
    info.textContent = `query ${i} ${JSON.stringify(tokens[i])} → key ${j} ${JSON.stringify(tokens[j])}: ` +
      `${Attention.at(tri, i, j).toFixed(4)}`;
  });
  canvas.addEventListener("click", (event) => {
    if (options.onQuery) options.onQuery(position(event)[0]);
  });
  return new Promise((resolve) => {
    let row = 0;
    function band() {
      const rows = Math.min(Attention.ROWS_PER_FRAME, side - row);
      const image = ctx.createImageData(side, rows);
      for (let r = 0; r < rows; r++) {
        const y = row + r;
        for (let x = 0; x <= y; x++) {
          let best = 0;
          for (let i = y * bin; i < Math.min(n, (y + 1) * bin); i++) {
            const base = i * (i + 1) / 2;
            for (let j = x * bin; j < Math.min(i + 1, (x + 1) * bin); j++) if (tri[base + j] > best) best = tri[base + j];
          }
          const [red, green, blue] = Attention.colour(best);
          const k = (r * side + x) * 4;
          image.data[k] = red; image.data[k + 1] = green; image.data[k + 2] = blue; image.data[k + 3] = 255;
        }
        for (let x = y + 1; x < side; x++) image.data[(r * side + x) * 4 + 3] = 0;
      }
      ctx.putImageData(image, 0, row);
      row += rows;
      if (row < side) requestAnimationFrame(band);
      else { canvas.dataset.drawn = "1"; resolve(canvas); }
    }
    requestAnimationFrame(band);
  });
};
