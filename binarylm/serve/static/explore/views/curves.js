// The run's training curves: loss on training and validation batches, and the learning-rate schedule.

import { el, legend, lineChart, note, SERIES } from '../draw.js';
import { count } from '../format.js';

export function renderCurves(lossBox, rateBox, curves) {
  const train = curves.train || [];
  const val = curves.val || [];
  if (!train.length && !val.length) {
    note(lossBox, 'This run has no training log (metrics.jsonl) to draw.');
    rateBox.replaceChildren();
    return;
  }
  const loss = [
    { name: 'train loss', colour: SERIES[0], points: train.map((r) => [r.step, r.loss]) },
    { name: 'val loss', colour: SERIES[1], width: 2.2, points: val.map((r) => [r.step, r.loss]) },
  ].filter((s) => s.points.length);
  lossBox.replaceChildren(lineChart(loss, { xLabel: 'step', yLabel: 'loss (nats per token)', format: count }),
    legend(loss));
  const rates = train.filter((r) => r.lr !== undefined && r.lr !== null).map((r) => [r.step, r.lr]);
  if (!rates.length) {
    note(rateBox, 'No learning rate was logged.');
    return;
  }
  const lr = [{ name: 'learning rate', colour: SERIES[2], points: rates }];
  rateBox.replaceChildren(lineChart(lr, { xLabel: 'step', yLabel: 'learning rate', format: count, zeroBased: true,
    height: 200 }), el('p', { class: 'caption', text: `peak ${Math.max(...rates.map((p) => p[1])).toExponential(2)}` }));
}
