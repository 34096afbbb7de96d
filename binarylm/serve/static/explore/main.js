// The explorer page: one state object, a function per view, and the wiring between controls and views.

import * as api from './api.js';
import { note } from './draw.js';
import { percent, visible } from './format.js';
import { filteredDistribution, sample } from './sampling.js';
import { drawAttention, fillLayerHead, fillNumbers } from './views/attention.js';
import { renderComparison } from './views/compare.js';
import { renderCurves } from './views/curves.js';
import { EmbeddingMap } from './views/embeddings.js';
import { renderLogitLens } from './views/logitlens.js';
import { drawMlp } from './views/mlp.js';
import { drawQkv } from './views/qkv.js';
import { renderNextToken, textOf } from './views/nexttoken.js';
import { renderResidual } from './views/residual.js';
import { highlightToken, renderTokens } from './views/tokens.js';

const $ = (id) => document.getElementById(id);

const state = {
  reply: null, // internals of the served checkpoint for the current tokens
  compared: null, // the same tokens through the checkpoint picked for comparison
  stepped: null, // the prompt box's text after Step: while it is unchanged, Analyze resends the ids as they are
  typed: 0, // how many of the tokens were typed (the rest were sampled with Step)
  run: null, // GET /v1/explore/checkpoints
};
let embeddingMap = null;

// ------------------------------------------------------------------ messages

function showError(message) {
  const box = $('error');
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $('error').hidden = true;
  $('error').textContent = '';
}

function setBusy(busy, text = '') {
  for (const id of ['analyze', 'step']) $(id).disabled = busy;
  document.body.classList.toggle('busy', busy);
  if (text) $('status').textContent = text;
}

// ------------------------------------------------------------------ the sampling controls

function samplingSettings() {
  return {
    temperature: Number($('temperature').value),
    topK: Number($('top-k').value),
    topP: Number($('top-p').value),
  };
}

function showSamplingValues() {
  const { temperature, topK, topP } = samplingSettings();
  $('temperature-value').textContent = temperature === 0 ? '0 (greedy)' : temperature.toFixed(2);
  $('top-k-value').textContent = topK === 0 ? 'off' : String(topK);
  $('top-p-value').textContent = topP >= 1 ? 'off' : topP.toFixed(2);
}

function nextDistribution(reply) {
  return filteredDistribution(api.array(reply.next_token.logits).data, samplingSettings());
}

// ------------------------------------------------------------------ asking the server

// Internals for {prompt} or {ids}; the views change only when the answer is good.
async function analyze(body) {
  clearError();
  setBusy(true, 'computing…');
  try {
    const reply = await api.internals({ ...body, top_k: Number($('lens-k').value) });
    state.reply = reply;
    $('status').textContent = `${reply.tokens.length} tokens · computed in ${Math.round(reply.timing_ms)} ms`;
    renderAll();
    await refreshComparison();
    return true;
  } catch (error) {
    showError(error.message);
    $('status').textContent = 'no answer';
    return false;
  } finally {
    setBusy(false);
  }
}

const stepping = () => state.reply !== null && state.stepped !== null && $('prompt').value === state.stepped;

async function analyzePrompt() {
  const text = $('prompt').value;
  if (stepping()) return analyze({ ids: state.reply.tokens.map((t) => t.id) });
  state.stepped = null; // edited text is tokenized afresh
  if (text === '') {
    showError('The prompt is empty: type some text to see what the model makes of it.');
    return false;
  }
  const done = await analyze({ prompt: text });
  if (done) state.typed = state.reply.tokens.length;
  return done;
}

// One token drawn from the filtered distribution (the likeliest at temperature 0), appended by id.
async function step() {
  if (!state.reply) {
    showError('Analyze a prompt first; Step then adds one token at a time.');
    return;
  }
  const distribution = nextDistribution(state.reply);
  const id = samplingSettings().temperature <= 0 ? distribution.order[0] : sample(distribution);
  const text = textOf(state.reply, id);
  const probability = distribution.probs[id];
  if (await analyze({ ids: [...state.reply.tokens.map((t) => t.id), id] })) {
    state.stepped = state.reply.tokens.map((t) => t.text).join('');
    $('prompt').value = state.stepped;
    markSampled();
    $('step-info').textContent = `added “${visible(text ?? state.reply.tokens.at(-1).text)}” (id ${id}), ` +
      `drawn with probability ${percent(probability)}`;
  }
}

async function refreshComparison() {
  const name = $('compare-checkpoint').value;
  state.compared = null;
  if (!name || !state.reply) {
    renderComparison($('compare'), null, null);
    return;
  }
  note($('compare'), `running the prompt through ${name}…`);
  try {
    const ids = state.reply.tokens.map((t) => t.id);
    state.compared = await api.internals({ ids, checkpoint: name, top_k: Number($('lens-k').value) });
  } catch (error) {
    showError(error.message);
    note($('compare'), `No comparison: ${error.message}`);
    return;
  }
  renderComparison($('compare'), state.reply, state.compared, samplingSettings());
}

async function loadRun() {
  try {
    state.run = await api.checkpoints();
  } catch (error) {
    $('run').textContent = 'run unknown';
    showError(error.message);
    return;
  }
  const { run, served, checkpoints } = state.run;
  $('run').textContent = `run ${run} · serving ${served} · ${checkpoints.length} checkpoint` +
    (checkpoints.length === 1 ? '' : 's');
  fillCheckpoints(checkpoints.filter((name) => name !== served));
}

function fillCheckpoints(others) {
  const select = $('compare-checkpoint');
  const wanted = select.value || new URLSearchParams(location.search).get('compare') || '';
  const options = [new Option(others.length ? '— none —' : '— no other checkpoint in this run —', '')];
  for (const name of others) options.push(new Option(name, name));
  if (wanted && !others.includes(wanted)) options.push(new Option(`${wanted} (not listed)`, wanted));
  select.replaceChildren(...options);
  select.value = wanted;
}

async function loadCurves() {
  try {
    renderCurves($('loss-curve'), $('lr-curve'), await api.curves());
  } catch (error) {
    note($('loss-curve'), `No training curves: ${error.message}`);
  }
}

async function loadEmbeddings() {
  $('embedding-info').textContent = 'loading the embedding map…';
  try {
    embeddingMap.load(await api.embeddings());
    embeddingMap.markPrompt(state.reply ? state.reply.tokens.map((t) => t.id) : []);
    searchEmbeddings();
  } catch (error) {
    $('embedding-info').textContent = `No embedding map: ${error.message}`;
  }
}

function searchEmbeddings() {
  const query = $('embedding-search').value;
  const found = embeddingMap.search(query);
  $('embedding-count').textContent = query ? `${found} token${found === 1 ? '' : 's'} match` : '';
}

// ------------------------------------------------------------------ drawing the views

function renderAll() {
  const reply = state.reply;
  describeModel(reply.config);
  renderTokens($('tokens'), reply.tokens, { onHover: (index) => highlightToken($('tokens'), index) });
  markSampled();
  fillLayerHead($('layer'), $('head'), reply.config);
  fillNumbers($('mlp-layer'), reply.config.n_layer, 'layer');
  renderAttention();
  renderLogitLens($('logit-lens'), reply, { info: $('lens-info') });
  renderResidual($('residual'), reply, $('residual-stage').value);
  renderMlp();
  renderSampling();
  if (embeddingMap) embeddingMap.markPrompt(reply.tokens.map((t) => t.id));
}

function describeModel(config) {
  $('model').textContent = `${config.n_layer} layers × ${config.n_head} heads (${config.n_kv_heads} key/value), ` +
    `d_model ${config.d_model}, d_ff ${config.d_ff}, vocabulary ${config.vocab_size}, context ` +
    `${config.context_length}; ${config.position} positions, ${config.norm}, ${config.mlp}`;
}

function markSampled() {
  for (const chip of $('tokens').querySelectorAll('.token')) {
    chip.classList.toggle('sampled', stepping() && Number(chip.dataset.index) >= state.typed);
  }
}

function renderAttention() {
  if (!state.reply) return;
  const choice = { layer: Number($('layer').value), head: Number($('head').value) };
  drawAttention($('attention-canvas'), $('attention-info'), state.reply, { ...choice, mode: $('attention-mode').value });
  drawQkv($('qkv'), $('qkv-info'), state.reply, choice);
}

function renderMlp() {
  if (state.reply) drawMlp($('mlp'), $('mlp-info'), state.reply, Number($('mlp-layer').value));
}

function renderSampling() {
  showSamplingValues();
  if (!state.reply) return;
  renderNextToken($('next-token'), state.reply, nextDistribution(state.reply), { limit: 15 });
  if (state.compared) renderComparison($('compare'), state.reply, state.compared, samplingSettings());
}

// ------------------------------------------------------------------ wiring

function wire() {
  $('prompt-form').addEventListener('submit', (event) => {
    event.preventDefault();
    analyzePrompt();
  });
  $('prompt').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      analyzePrompt();
    }
  });
  $('step').addEventListener('click', step);
  for (const id of ['layer', 'head', 'attention-mode']) $(id).addEventListener('change', renderAttention);
  $('mlp-layer').addEventListener('change', renderMlp);
  $('residual-stage').addEventListener('change', () => state.reply && renderResidual($('residual'), state.reply,
    $('residual-stage').value));
  for (const id of ['temperature', 'top-k', 'top-p']) $(id).addEventListener('input', renderSampling);
  $('lens-k').addEventListener('change', () => state.reply && analyzePrompt());
  $('compare-checkpoint').addEventListener('change', () => {
    clearError();
    refreshComparison();
  });
  $('embedding-search').addEventListener('input', searchEmbeddings);
  $('key-form').addEventListener('submit', (event) => {
    event.preventDefault();
    api.setApiKey($('api-key').value.trim());
    start();
  });
  window.addEventListener('error', (event) => showError(`The page hit an error: ${event.message}`));
  window.addEventListener('unhandledrejection', (event) =>
    showError(`The page hit an error: ${event.reason?.message ?? event.reason}`));
}

async function start() {
  clearError();
  await loadRun();
  await analyzePrompt();
  loadCurves();
  loadEmbeddings();
}

function init() {
  $('api-key').value = api.apiKey();
  const prompt = new URLSearchParams(location.search).get('prompt');
  if (prompt !== null) $('prompt').value = prompt;
  embeddingMap = new EmbeddingMap($('embedding-canvas'), $('embedding-info'));
  showSamplingValues();
  wire();
  start();
}

init();
