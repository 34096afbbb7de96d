// Attention of one layer and head as a query x key grid, in any of its four stages:
// raw q·k, scaled by 1/sqrt(head_dim), masked (future keys at −∞), and the softmax weights.

import { array } from '../api.js';
import { diverging, pointer, sequential, sizeCanvas } from '../draw.js';
import { number, short, visible } from '../format.js';

const LABELLED_UP_TO = 40; // longer prompts: no axis labels, hover for names
const MAX_SIZE = 620;

// Fill the layer and head selects for this model, keeping the current choice where it still exists.
export function fillLayerHead(layerSelect, headSelect, config) {
  fillNumbers(layerSelect, config.n_layer, 'layer');
  fillNumbers(headSelect, config.n_head, 'head');
}

export function fillNumbers(select, count, word) {
  const chosen = Math.min(Number(select.value) || 0, count - 1);
  select.replaceChildren(...Array.from({ length: count }, (_, i) => new Option(`${word} ${i}`, String(i))));
  select.value = String(chosen);
}

// The grid's geometry: cell size and margins for labels.
function layout(T) {
  const labelled = T <= LABELLED_UP_TO;
  const margin = labelled ? 70 : 8;
  const cell = Math.max(2, Math.min(28, Math.floor((MAX_SIZE - margin) / T)));
  return { labelled, margin, cell, size: margin + cell * T + 4 };
}

// Values of one head at one stage: {data, T, at(q, k)}.
function headValues(reply, layer, head, mode) {
  const { shape, data } = array(reply.layers[layer].attention[mode]); // (H, T, T)
  const T = shape[1];
  const offset = head * T * T;
  return { T, at: (q, k) => data[offset + q * T + k] };
}

// The colour of a value: weights on 0..1, scores on a signed scale of the head's largest finite size.
function colourScale(values, mode) {
  if (mode === 'softmax') return (v) => sequential(v);
  let largest = 1e-9;
  for (let q = 0; q < values.T; q++) {
    for (let k = 0; k < values.T; k++) {
      const v = values.at(q, k);
      if (Number.isFinite(v)) largest = Math.max(largest, Math.abs(v));
    }
  }
  return (v) => diverging(v / largest);
}

export function drawAttention(canvas, info, reply, { layer, head, mode }) {
  const values = headValues(reply, layer, head, mode);
  const { T } = values;
  const { labelled, margin, cell, size } = layout(T);
  const context = sizeCanvas(canvas, size, size);
  const colour = colourScale(values, mode);
  context.clearRect(0, 0, size, size);
  for (let q = 0; q < T; q++) {
    for (let k = 0; k < T; k++) {
      const v = values.at(q, k);
      if (!Number.isFinite(v)) continue; // masked (−∞): left blank
      context.fillStyle = colour(v);
      context.fillRect(margin + k * cell, margin + q * cell, cell, cell);
    }
  }
  context.strokeStyle = '#cbd5e1';
  context.strokeRect(margin - 0.5, margin - 0.5, cell * T + 1, cell * T + 1);
  if (labelled) drawLabels(context, reply.tokens, margin, cell);
  canvas.onmousemove = (event) => describeCell(info, reply, values, pointer(canvas, event), { margin, cell, mode });
  canvas.onmouseleave = () => {
    info.textContent = 'Hover a cell: which key (column) each query (row) looks at.';
  };
  canvas.onmouseleave();
}

function drawLabels(context, tokens, margin, cell) {
  context.fillStyle = '#334155';
  context.font = '11px ui-monospace, monospace';
  context.textBaseline = 'middle';
  tokens.forEach((token, i) => {
    const text = short(token.text, 8);
    context.textAlign = 'right';
    context.fillText(text, margin - 4, margin + (i + 0.5) * cell); // query down the left
    context.save();
    context.translate(margin + (i + 0.5) * cell, margin - 4);
    context.rotate(-Math.PI / 2);
    context.textAlign = 'left';
    context.fillText(text, 0, 0); // key along the top
    context.restore();
  });
}

function describeCell(info, reply, values, [x, y], { margin, cell, mode }) {
  const q = Math.floor((y - margin) / cell);
  const k = Math.floor((x - margin) / cell);
  if (q < 0 || k < 0 || q >= values.T || k >= values.T) return;
  const v = values.at(q, k);
  const name = (i) => `${i} “${visible(reply.tokens[i].text)}”`;
  const value = Number.isFinite(v) ? number(v) : '−∞ (masked: a query cannot see later tokens)';
  const shown = mode === 'softmax' && v === 0 && k > q ? '0 (masked)' : value;
  info.textContent = `query ${name(q)} → key ${name(k)}: ${shown}`;
}
