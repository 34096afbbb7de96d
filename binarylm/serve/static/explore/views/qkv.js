// The query, key and value vectors of one head: positions (rows) x dimensions (columns), red positive, blue
// negative. A query row meets every key row in a dot product (the raw score); the softmax weights then mix the
// value rows.

import { array } from '../api.js';
import { el, heatmapCanvas, pointer } from '../draw.js';
import { number, visible } from '../format.js';

const COLUMN = 4; // CSS pixels per dimension
const HEIGHT = 240; // CSS pixels for all positions

export function drawQkv(container, info, reply, { layer, head }) {
  const panels = ['q', 'k', 'v'].map((name) => panel(name, array(reply.layers[layer][name]), head, info, reply));
  container.replaceChildren(...panels);
  info.textContent = `layer ${layer}, head ${head}: hover a row for its vector's values.`;
}

function panel(name, { shape, data }, head, info, reply) {
  const [, T, width] = shape; // (H, T, head_dim)
  const rows = data.subarray(head * T * width, (head + 1) * T * width); // (T, head_dim)
  const largest = rows.reduce((m, v) => Math.max(m, Math.abs(v)), 1e-9);
  const canvas = heatmapCanvas(rows, T, width, largest);
  const rowHeight = HEIGHT / T;
  canvas.style.width = `${COLUMN * width}px`;
  canvas.style.height = `${HEIGHT}px`;
  canvas.dataset.vector = name;
  canvas.onmousemove = (event) => {
    const [x, y] = pointer(canvas, event);
    const t = Math.min(T - 1, Math.floor(y / rowHeight));
    const d = Math.min(width - 1, Math.floor(x / COLUMN));
    const norm = Math.sqrt(rows.subarray(t * width, (t + 1) * width).reduce((s, v) => s + v * v, 0));
    info.textContent = `${name} at position ${t} “${visible(reply.tokens[t].text)}”: dimension ${d} = ` +
      `${number(rows[t * width + d])}, length ${number(norm)}`;
  };
  return el('figure', { class: 'qkv' }, [el('figcaption', {}, [name]), canvas]);
}
