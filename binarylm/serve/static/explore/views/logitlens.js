// The logit lens: each layer's output read by the final norm and the output head, as if the model stopped there.
// Rows are layers, columns positions; a cell shows the top guess for the NEXT token and its probability.

import { el, note, sequential } from '../draw.js';
import { percent, short, visible } from '../format.js';

// A table of layers x positions; `info` (optional) receives the hovered cell's top-k list.
export function renderLogitLens(container, reply, { info = null, cellText = 6 } = {}) {
  const layers = reply.layers;
  if (!layers.length) {
    note(container, 'This model has no layers to read.');
    return;
  }
  const T = reply.tokens.length;
  const head = el('tr', {}, [el('th', { text: 'layer \\ position', class: 'corner' }),
    ...reply.tokens.map((token, i) => el('th', { text: short(token.text, cellText), title: `position ${i}` }))]);
  const rows = layers.map((layer, l) => {
    const lens = layer.logit_lens;
    const cells = Array.from({ length: T }, (_, t) => lensCell(lens, l, t, reply, info, cellText));
    return el('tr', {}, [el('th', { text: `${l}`, title: `layer ${l}` }), ...cells]);
  });
  container.replaceChildren(el('table', { class: 'lens' }, [el('thead', {}, head), el('tbody', {}, rows.reverse())]));
}

function lensCell(lens, layer, position, reply, info, cellText) {
  const prob = lens.probs[position][0];
  const text = lens.texts[position][0];
  const actual = reply.tokens[position + 1]; // the token that really came next, if any
  const hit = actual !== undefined && actual.id === lens.ids[position][0];
  const cell = el('td', {
    class: 'cell' + (hit ? ' hit' : '') + (prob > 0.55 ? ' dark' : ''),
    'data-layer': layer,
    'data-position': position,
    title: topList(lens, position),
  }, [el('span', { class: 'guess', text: short(text, cellText) }), el('span', { class: 'p', text: percent(prob) })]);
  cell.style.background = sequential(prob);
  if (info) {
    cell.addEventListener('mouseenter', () => {
      const after = `after position ${position} “${visible(reply.tokens[position].text)}”, layer ${layer}`;
      const truth = actual ? `; the next token really is “${visible(actual.text)}”` : '';
      info.textContent = `${after}: ${topList(lens, position).replaceAll('\n', ', ')}${truth}`;
    });
  }
  return cell;
}

function topList(lens, position) {
  return lens.texts[position].map((text, i) => `“${visible(text)}” ${percent(lens.probs[position][i])}`).join('\n');
}
