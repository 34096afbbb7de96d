// The next-token distribution after temperature, top-k and top-p: bars of the likeliest tokens.

import { el, note } from '../draw.js';
import { percent, visible } from '../format.js';
import { entropyBits } from '../sampling.js';

// A token's text from the reply's list of the likeliest ids (others are rare: shown by id).
export function textOf(reply, id) {
  const at = reply.next_token.ids.indexOf(id);
  return at >= 0 ? reply.next_token.texts[at] : null;
}

// Bars for the `limit` likeliest tokens of `distribution` ({probs, order, kept}): those top-k or top-p removed are
// greyed out at 0%, the last sampled one (`chosen`) is marked.
export function renderNextToken(container, reply, distribution, { limit = 15, chosen = null } = {}) {
  const { probs, order, kept } = distribution;
  if (!order.length) {
    note(container, 'No distribution yet.');
    return;
  }
  const top = probs[order[0]] || 1;
  const bars = order.slice(0, limit).map((id, rank) => {
    const text = textOf(reply, id);
    const state = (rank >= kept ? ' removed' : '') + (id === chosen ? ' chosen' : '');
    const title = rank >= kept ? `id ${id}: removed by top-k / top-p` : `id ${id}`;
    return el('div', { class: 'bar' + state, 'data-id': id, title }, [
      el('span', { class: 'label', text: text === null ? `#${id}` : visible(text) }),
      el('span', { class: 'track' }, el('span', { class: 'fill', style: `width:${(100 * probs[id]) / top}%` })),
      el('span', { class: 'value', text: percent(probs[id]) }),
    ]);
  });
  const summary = el('p', { class: 'summary',
    text: `${kept} of ${order.length} tokens can be drawn · entropy ${entropyBits(distribution).toFixed(2)} bits` });
  container.replaceChildren(summary, ...bars);
}
