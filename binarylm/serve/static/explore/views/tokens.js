// The prompt as the model sees it: one chip per token, whitespace visible, id and bytes on hover.

import { el, note } from '../draw.js';
import { visible } from '../format.js';

// Bytes as "e2 82 ac" (the contract sends them as one hex string).
function spacedHex(hex) {
  return hex.match(/../g)?.join(' ') ?? '';
}

export function renderTokens(container, tokens, { onHover = () => {} } = {}) {
  if (!tokens.length) {
    note(container, 'No tokens yet: type a prompt and press Analyze.');
    return;
  }
  const chips = tokens.map((token, index) => {
    const chip = el('span', {
      class: 'token' + (token.text.includes('\ufffd') ? ' partial' : ''),
      text: visible(token.text),
      title: `position ${index} · id ${token.id} · bytes ${spacedHex(token.bytes)}`,
      'data-index': index,
      'data-id': token.id,
      'data-bytes': token.bytes,
    });
    chip.addEventListener('mouseenter', () => onHover(index));
    chip.addEventListener('mouseleave', () => onHover(null));
    return chip;
  });
  container.replaceChildren(...chips);
}

// Mark the chip at `index` (another view is pointing at that position).
export function highlightToken(container, index) {
  for (const chip of container.querySelectorAll('.token')) {
    chip.classList.toggle('focus', Number(chip.dataset.index) === index);
  }
}
