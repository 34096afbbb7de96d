// The next-token distribution as the sampler sees it: softmax(logits / T), then top-k and top-p, renormalised.
// The same rules as binarylm/infer/sampling.py: top-k keeps the k largest logits; top-p keeps a token while the
// probability of the tokens ranked above it is still below p (so the likeliest token always stays); T = 0 is greedy.

const orders = new WeakMap();

// Token ids from the likeliest to the least likely (temperature never changes the order).
export function rankOrder(logits) {
  if (!orders.has(logits)) {
    const order = Array.from(logits.keys());
    order.sort((a, b) => logits[b] - logits[a] || a - b);
    orders.set(logits, order);
  }
  return orders.get(logits);
}

// {probs: Float32Array (V), order, kept}: each token's probability after the three settings (0 when removed).
export function filteredDistribution(logits, { temperature = 1, topK = 0, topP = 1 } = {}) {
  const order = rankOrder(logits);
  const probs = new Float32Array(logits.length);
  if (temperature <= 0) { // greedy: all the mass on the likeliest token
    probs[order[0]] = 1;
    return { probs, order, kept: 1 };
  }
  let kept = topK > 0 ? Math.min(topK, order.length) : order.length;
  const top = logits[order[0]] / temperature;
  const weights = new Float64Array(kept);
  let total = 0;
  for (let r = 0; r < kept; r++) {
    weights[r] = Math.exp(logits[order[r]] / temperature - top); // shifted by the largest: no overflow
    total += weights[r];
  }
  if (topP < 1) { // cut where the mass above reaches p
    let above = 0;
    for (let r = 0; r < kept; r++) {
      if (above >= topP) {
        kept = r;
        break;
      }
      above += weights[r] / total;
    }
    total = 0;
    for (let r = 0; r < kept; r++) total += weights[r];
  }
  for (let r = 0; r < kept; r++) probs[order[r]] = weights[r] / total;
  return { probs, order, kept };
}

// One token id drawn from a filtered distribution; `random` returns a number in [0, 1).
export function sample({ probs, order, kept }, random = Math.random) {
  let u = random();
  for (let r = 0; r < kept; r++) {
    u -= probs[order[r]];
    if (u < 0) return order[r];
  }
  return order[kept - 1]; // rounding left a sliver of mass: the last kept token takes it
}

// Entropy of a distribution in bits: how many yes/no questions the next token is worth.
export function entropyBits({ probs, order, kept }) {
  let bits = 0;
  for (let r = 0; r < kept; r++) {
    const p = probs[order[r]];
    if (p > 0) bits -= p * Math.log2(p);
  }
  return bits;
}
