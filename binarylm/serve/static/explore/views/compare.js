// Two checkpoints of one run, the same tokens through both: how training changed the prediction and the layers.

import { el, note } from '../draw.js';
import { filteredDistribution } from '../sampling.js';
import { array } from '../api.js';
import { renderLogitLens } from './logitlens.js';
import { renderNextToken } from './nexttoken.js';

// `left` and `right` are internals replies for the same ids; `settings` the sampling sliders.
export function renderComparison(container, left, right, settings) {
  if (!left || !right) {
    note(container, 'Pick a second checkpoint of this run to see the same prompt through both.');
    return;
  }
  container.replaceChildren(el('div', { class: 'sides' }, [side(left, settings, 'left'), side(right, settings, 'right')]));
}

function side(reply, settings, which) {
  const bars = el('div', { class: 'next-token' });
  const lens = el('div', { class: 'lens-wrap' });
  renderNextToken(bars, reply, filteredDistribution(array(reply.next_token.logits).data, settings), { limit: 10 });
  renderLogitLens(lens, reply, { cellText: 4 });
  return el('div', { class: 'side', 'data-side': which, 'data-checkpoint': reply.checkpoint }, [
    el('h3', { text: reply.checkpoint }),
    el('h4', { text: 'next token' }), bars,
    el('h4', { text: 'logit lens' }), lens,
  ]);
}
