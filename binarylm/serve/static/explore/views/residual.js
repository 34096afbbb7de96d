// How large the residual stream is at each position, layer by layer: the vector every block reads and adds to.

import { depthColour, legend, lineChart, note, SERIES } from '../draw.js';

const STAGES = { input: 'entering the block', after_attention: 'after attention', output: 'leaving the block' };

// `stage` is one of STAGES (lines: one per layer, across positions) or "depth" (lines: stages through the network).
export function renderResidual(container, reply, stage) {
  const layers = reply.layers;
  if (!layers.length) {
    note(container, 'This model has no layers.');
    return;
  }
  const series = stage === 'depth' ? throughDepth(layers) : acrossPositions(layers, stage);
  const options = stage === 'depth'
    ? { xLabel: 'stage (0 = embeddings; then attention and MLP of each layer)', yLabel: 'L2 norm' }
    : { xLabel: 'position', yLabel: 'L2 norm' };
  container.replaceChildren(lineChart(series, { ...options, zeroBased: true }), legend(series.slice(0, 12)));
}

function acrossPositions(layers, stage) {
  return layers.map((layer, l) => ({
    name: `layer ${l} ${STAGES[stage]}`,
    colour: depthColour(l, layers.length),
    points: layer.residual_norm[stage].map((norm, t) => [t, norm]),
  }));
}

// Mean, smallest and largest norm over positions at each stage: embeddings, then attention and MLP per layer.
function throughDepth(layers) {
  const stages = [layers[0].residual_norm.input];
  for (const layer of layers) stages.push(layer.residual_norm.after_attention, layer.residual_norm.output);
  const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
  return [
    { name: 'mean over positions', colour: SERIES[0], width: 2.4, points: stages.map((s, i) => [i, mean(s)]) },
    { name: 'largest', colour: SERIES[1], points: stages.map((s, i) => [i, Math.max(...s)]) },
    { name: 'smallest', colour: SERIES[2], points: stages.map((s, i) => [i, Math.min(...s)]) },
  ];
}
