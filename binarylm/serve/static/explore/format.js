// Showing tokens and numbers: whitespace made visible, probabilities and scores in few characters.

const VISIBLE = { ' ': '·', '\n': '↵', '\t': '→', '\r': '␍' };

// A token's text with spaces, newlines and tabs drawn as marks (an empty text as ∅).
export function visible(text) {
  if (text === '') return '∅';
  return text.replace(/[ \n\t\r]/g, (c) => VISIBLE[c]);
}

// A shorter form for tight cells.
export function short(text, length = 6) {
  const shown = visible(text);
  return shown.length > length ? shown.slice(0, length - 1) + '…' : shown;
}

export function percent(p) {
  if (p >= 0.995) return '100%';
  if (p >= 0.1) return `${(p * 100).toFixed(0)}%`;
  if (p >= 0.001) return `${(p * 100).toFixed(1)}%`;
  return p > 0 ? '<0.1%' : '0%';
}

export function number(v) {
  if (v === -Infinity) return '−∞';
  if (v === Infinity) return '∞';
  if (Number.isNaN(v)) return 'NaN';
  const size = Math.abs(v);
  if (size !== 0 && (size < 1e-3 || size >= 1e5)) return v.toExponential(2);
  return v.toFixed(size >= 100 ? 1 : 3);
}

// A step count as 1.2k / 3.4M.
export function count(n) {
  if (n >= 1e6) return `${+(n / 1e6).toFixed(1)}M`;
  if (n >= 1e3) return `${+(n / 1e3).toFixed(1)}k`;
  return String(n);
}
