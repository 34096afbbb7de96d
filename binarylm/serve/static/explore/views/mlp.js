// The MLP's hidden activations of one layer: positions (rows) x neurons (columns), after the nonlinearity.
// Red is positive, blue negative; most neurons are quiet most of the time, a few fire for specific tokens.

import { array } from '../api.js';
import { heatmapCanvas, note, pointer } from '../draw.js';
import { number, visible } from '../format.js';

const WIDTH = 760;
const TOP = 6; // neurons listed per position on hover

export function drawMlp(container, info, reply, layer) {
  const payload = reply.layers[layer].mlp;
  if (!payload) {
    note(container, 'This layer is a mixture of experts: each token goes through its own experts, so there is no ' +
      'single MLP to show.');
    info.textContent = '';
    return;
  }
  const { shape, data } = array(payload); // (T, d_ff)
  const [T, width] = shape;
  const largest = data.reduce((m, v) => Math.max(m, Math.abs(v)), 1e-9);
  const canvas = heatmapCanvas(data, T, width, largest);
  const rowHeight = Math.max(3, Math.min(18, Math.floor(360 / T)));
  const columnWidth = Math.max(WIDTH / width, 0.5);
  canvas.style.width = `${Math.round(columnWidth * width)}px`;
  canvas.style.height = `${rowHeight * T}px`;
  canvas.id = 'mlp-canvas';
  container.replaceChildren(canvas);
  canvas.onmousemove = (event) => {
    const [x, y] = pointer(canvas, event);
    const t = Math.min(T - 1, Math.floor(y / rowHeight));
    const n = Math.min(width - 1, Math.floor(x / columnWidth));
    info.textContent = `position ${t} “${visible(reply.tokens[t].text)}”, neuron ${n}: ${number(data[t * width + n])}` +
      ` · strongest here: ${strongest(data, t, width)}`;
  };
  canvas.onmouseleave = () => {
    info.textContent = `layer ${layer}: ${width} neurons; largest |activation| ${number(largest)}. Hover a row.`;
  };
  canvas.onmouseleave();
}

function strongest(data, t, width) {
  const row = data.subarray(t * width, (t + 1) * width);
  const order = Array.from(row.keys()).sort((a, b) => row[b] - row[a]).slice(0, TOP);
  return order.map((n) => `#${n} ${number(row[n])}`).join(', ');
}
