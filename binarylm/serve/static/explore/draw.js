// Drawing without a library: element builders, colour scales, a high-DPI canvas, and a small SVG line chart.

const SVG = 'http://www.w3.org/2000/svg';

// An HTML element; `children` are elements or strings (always inserted as text, never as HTML).
export function el(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === 'class') node.className = value;
    else if (name === 'text') node.textContent = value;
    else if (name.startsWith('data-')) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of [].concat(children)) node.append(child);
  return node;
}

export function svg(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

// A message in place of a view (no data, an error): never an empty box.
export function note(container, message) {
  container.replaceChildren(el('p', { class: 'empty', text: message }));
}

// ------------------------------------------------------------------ colours

const clamp = (t) => Math.max(0, Math.min(1, t));

// 0 -> near white, 1 -> deep blue: probabilities and attention weights.
export function sequential(t) {
  t = clamp(t);
  const r = Math.round(247 - t * (247 - 8));
  const g = Math.round(251 - t * (251 - 69));
  const b = Math.round(255 - t * (255 - 148));
  return `rgb(${r},${g},${b})`;
}

// -1 -> blue, 0 -> white, 1 -> red: signed scores and activations.
export function diverging(t) {
  t = Math.max(-1, Math.min(1, t));
  const [r, g, b] = t >= 0
    ? [255 - t * (255 - 178), 255 - t * (255 - 24), 255 - t * (255 - 43)]
    : [255 + t * (255 - 33), 255 + t * (255 - 102), 255 + t * (255 - 172)];
  return `rgb(${Math.round(r)},${Math.round(g)},${Math.round(b)})`;
}

// The same scales as [r, g, b] numbers, for filling ImageData.
export function divergingRGB(t) {
  return diverging(t).slice(4, -1).split(',').map(Number);
}

// A palette for lines: light to dark as depth grows (i of n).
export function depthColour(i, n) {
  const t = n <= 1 ? 1 : i / (n - 1);
  return `hsl(${220 - t * 40}, 70%, ${72 - t * 45}%)`;
}

export const SERIES = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2'];

// ------------------------------------------------------------------ canvas

// A canvas of CSS size width x height drawn at the screen's pixel density; returns its 2-D context.
export function sizeCanvas(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(width * ratio));
  canvas.height = Math.max(1, Math.round(height * ratio));
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const context = canvas.getContext('2d');
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  return context;
}

// The mouse position in the canvas's CSS pixels.
export function pointer(canvas, event) {
  const box = canvas.getBoundingClientRect();
  return [event.clientX - box.left, event.clientY - box.top];
}

// ------------------------------------------------------------------ line chart

// About `count` round tick values covering [low, high].
export function ticks(low, high, count = 5) {
  if (!(high > low)) return [low];
  const raw = (high - low) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const values = [];
  for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) values.push(+v.toPrecision(12));
  return values;
}

function extent(series, axis) {
  let low = Infinity;
  let high = -Infinity;
  for (const s of series) {
    for (const point of s.points) {
      if (Number.isFinite(point[axis])) {
        low = Math.min(low, point[axis]);
        high = Math.max(high, point[axis]);
      }
    }
  }
  if (low === Infinity) return [0, 1];
  if (low === high) {  // a constant (a flat learning rate): a band around it scaled to its size
    const half = Math.abs(low) * 0.1 || 1;
    return [low - half, high + half];
  }
  return [low, high];
}

// An SVG line chart of `series` ([{name, colour, points: [[x, y]]}]) with axes, a legend and a hover readout.
export function lineChart(series, { width = 560, height = 260, xLabel = '', yLabel = '', format = String,
  zeroBased = false } = {}) {
  const margin = { left: 58, right: 12, top: 12, bottom: 38 };
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const [x0, x1] = extent(series, 0);
  let [y0, y1] = extent(series, 1);
  if (zeroBased) y0 = Math.min(0, y0);
  const pad = (y1 - y0) * 0.05;
  y0 -= zeroBased && y0 === 0 ? 0 : pad;
  y1 += pad;
  const sx = (x) => margin.left + ((x - x0) / (x1 - x0 || 1)) * plotW;
  const sy = (y) => margin.top + plotH - ((y - y0) / (y1 - y0 || 1)) * plotH;
  const chart = svg('svg', { width, height, viewBox: `0 0 ${width} ${height}`, class: 'chart', role: 'img' });
  chart.append(axes({ sx, sy, x0, x1, y0, y1, margin, plotW, plotH, width, height, xLabel, yLabel, format }));
  for (const s of series) {
    const points = s.points.filter((p) => Number.isFinite(p[1])).map((p) => `${sx(p[0])},${sy(p[1])}`).join(' ');
    chart.append(svg('polyline', { points, fill: 'none', stroke: s.colour, 'stroke-width': s.width || 1.6,
      'data-series': s.name }));
    if (s.points.length === 1) {
      chart.append(svg('circle', { cx: sx(s.points[0][0]), cy: sy(s.points[0][1]), r: 3, fill: s.colour }));
    }
  }
  addHover(chart, series, { sx, sy, x0, x1, margin, plotW, plotH, format });
  return chart;
}

function axes({ sx, sy, x0, x1, y0, y1, margin, plotH, plotW, width, height, xLabel, yLabel, format }) {
  const group = svg('g', { class: 'axes' });
  for (const x of ticks(x0, x1, 6)) {
    group.append(svg('line', { x1: sx(x), x2: sx(x), y1: margin.top, y2: margin.top + plotH, class: 'grid' }));
    group.append(svg('text', { x: sx(x), y: margin.top + plotH + 14, 'text-anchor': 'middle' }, format(x)));
  }
  for (const y of ticks(y0, y1, 5)) {
    group.append(svg('line', { x1: margin.left, x2: margin.left + plotW, y1: sy(y), y2: sy(y), class: 'grid' }));
    group.append(svg('text', { x: margin.left - 6, y: sy(y) + 4, 'text-anchor': 'end' }, +y.toPrecision(4)));
  }
  group.append(svg('rect', { x: margin.left, y: margin.top, width: plotW, height: plotH, class: 'frame' }));
  group.append(svg('text', { x: margin.left + plotW / 2, y: height - 4, 'text-anchor': 'middle', class: 'label' },
    xLabel));
  group.append(svg('text', { x: 12, y: margin.top + plotH / 2, 'text-anchor': 'middle', class: 'label',
    transform: `rotate(-90 12 ${margin.top + plotH / 2})` }, yLabel));
  return group;
}

// A vertical guide that follows the mouse and names each series' value at the nearest x.
function addHover(chart, series, { sx, sy, x0, x1, margin, plotW, plotH, format }) {
  const guide = svg('line', { y1: margin.top, y2: margin.top + plotH, class: 'guide', visibility: 'hidden' });
  const label = svg('text', { y: margin.top + 12, class: 'readout', visibility: 'hidden' });
  chart.append(guide, label);
  chart.addEventListener('mousemove', (event) => {
    const box = chart.getBoundingClientRect();
    const x = x0 + ((event.clientX - box.left - margin.left) / plotW) * (x1 - x0);
    const parts = [];
    for (const s of series.slice(0, 6)) {
      let best = null;
      for (const p of s.points) if (best === null || Math.abs(p[0] - x) < Math.abs(best[0] - x)) best = p;
      if (best) parts.push(`${s.name} ${+best[1].toPrecision(4)}`);
    }
    const at = Math.max(x0, Math.min(x1, x));
    guide.setAttribute('x1', sx(at));
    guide.setAttribute('x2', sx(at));
    label.setAttribute('x', Math.min(sx(at) + 6, margin.left + plotW - 200));
    label.textContent = `${format(Math.round(at))}: ${parts.join(' · ')}`;
    guide.setAttribute('visibility', 'visible');
    label.setAttribute('visibility', 'visible');
  });
  chart.addEventListener('mouseleave', () => {
    guide.setAttribute('visibility', 'hidden');
    label.setAttribute('visibility', 'hidden');
  });
}

// A legend: coloured marks with names.
export function legend(series) {
  return el('div', { class: 'legend' }, series.map((s) =>
    el('span', { class: 'key' }, [el('i', { style: `background:${s.colour}` }), s.name])));
}

// One pixel per cell of a (rows, columns) array, red positive and blue negative, stretched by CSS: a big grid
// drawn in one go.
export function heatmapCanvas(data, rows, columns, largest) {
  const canvas = document.createElement('canvas');
  canvas.width = columns;
  canvas.height = rows;
  const context = canvas.getContext('2d');
  const image = context.createImageData(columns, rows);
  for (let i = 0; i < rows * columns; i++) {
    const [r, g, b] = divergingRGB(data[i] / largest);
    image.data.set([r, g, b, 255], i * 4);
  }
  context.putImageData(image, 0, 0);
  canvas.className = 'pixelated';
  return canvas;
}
