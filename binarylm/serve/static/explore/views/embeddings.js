// Every token embedding projected on its two main directions of variation (PCA): tokens that the model treats
// alike land near each other. Search to highlight tokens; the prompt's tokens are ringed.

import { array } from '../api.js';
import { pointer, sizeCanvas } from '../draw.js';
import { visible } from '../format.js';

const WIDTH = 720;
const HEIGHT = 460;
const PAD = 14;

// Everything the map needs to redraw quickly: screen positions of every token, and which ones to mark.
export class EmbeddingMap {
  constructor(canvas, info) {
    this.canvas = canvas;
    this.info = info;
    this.points = null; // Float32Array of screen x, y per token
    this.texts = [];
    this.matches = new Set();
    this.prompt = new Set();
    canvas.onmousemove = (event) => this.hover(pointer(canvas, event));
  }

  load(payload) {
    const { data, shape } = array(payload.xy); // (V, 2)
    const V = shape[0];
    let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
    for (let i = 0; i < V; i++) {
      x0 = Math.min(x0, data[2 * i]);
      x1 = Math.max(x1, data[2 * i]);
      y0 = Math.min(y0, data[2 * i + 1]);
      y1 = Math.max(y1, data[2 * i + 1]);
    }
    this.points = new Float32Array(2 * V);
    for (let i = 0; i < V; i++) {
      this.points[2 * i] = PAD + ((data[2 * i] - x0) / (x1 - x0 || 1)) * (WIDTH - 2 * PAD);
      this.points[2 * i + 1] = HEIGHT - PAD - ((data[2 * i + 1] - y0) / (y1 - y0 || 1)) * (HEIGHT - 2 * PAD);
    }
    this.texts = payload.texts;
    this.explained = payload.explained;
    this.draw();
  }

  // Highlight tokens whose text contains `query` (case-insensitive; "·" and "↵" match spaces and newlines too).
  search(query) {
    this.matches = new Set();
    const wanted = query.toLowerCase();
    if (wanted) {
      this.texts.forEach((text, id) => {
        if (text.toLowerCase().includes(wanted) || visible(text).toLowerCase().includes(wanted)) this.matches.add(id);
      });
    }
    this.draw();
    return this.matches.size;
  }

  markPrompt(ids) {
    this.prompt = new Set(ids);
    this.draw();
  }

  draw() {
    if (!this.points) return;
    const context = sizeCanvas(this.canvas, WIDTH, HEIGHT);
    context.fillStyle = '#fff';
    context.fillRect(0, 0, WIDTH, HEIGHT);
    const dim = this.matches.size > 0;
    context.fillStyle = dim ? 'rgba(100,116,139,0.18)' : 'rgba(51,65,85,0.45)';
    for (let i = 0; i < this.texts.length; i++) context.fillRect(this.points[2 * i] - 1, this.points[2 * i + 1] - 1, 2, 2);
    context.strokeStyle = '#2563eb';
    for (const id of this.prompt) this.ring(context, id, 4);
    context.fillStyle = '#ea580c';
    context.font = '11px ui-monospace, monospace';
    let labelled = 0;
    for (const id of this.matches) {
      const [x, y] = [this.points[2 * id], this.points[2 * id + 1]];
      context.fillRect(x - 2.5, y - 2.5, 5, 5);
      if (labelled++ < 40) context.fillText(visible(this.texts[id]), x + 4, y - 3);
    }
    this.caption();
  }

  ring(context, id, radius) {
    if (id >= this.texts.length) return;
    context.beginPath();
    context.arc(this.points[2 * id], this.points[2 * id + 1], radius, 0, 2 * Math.PI);
    context.stroke();
  }

  caption() {
    const [a, b] = (this.explained || [0, 0]).map((v) => `${(100 * v).toFixed(1)}%`);
    this.info.textContent = `${this.texts.length} tokens; the axes explain ${a} and ${b} of the variance. ` +
      'Hover a point to name it.';
  }

  // Name the token nearest the mouse (within a few pixels).
  hover([x, y]) {
    if (!this.points) return;
    let best = -1;
    let bestDistance = 36; // 6 px squared
    for (let i = 0; i < this.texts.length; i++) {
      const d = (this.points[2 * i] - x) ** 2 + (this.points[2 * i + 1] - y) ** 2;
      if (d < bestDistance) [best, bestDistance] = [i, d];
    }
    if (best < 0) this.caption();
    else this.info.textContent = `id ${best} “${visible(this.texts[best])}”`;
  }
}
