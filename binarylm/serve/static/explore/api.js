// Talking to the server: the API key, JSON calls, errors in words, and arrays off the wire.

const KEY_STORAGE = 'binarylm.explorer.apiKey';

export function apiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || '';
  } catch {
    return ''; // storage disabled (private mode): no key remembered
  }
}

export function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // nothing to do: the key just is not remembered
  }
}

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status; // 0 when the server could not be reached
  }
}

// One call; the server's OpenAI-shaped error ({"error": {"message"}}) becomes an ApiError with its message.
async function call(path, { method = 'GET', body } = {}) {
  const headers = {};
  if (body !== undefined) headers['content-type'] = 'application/json';
  const key = apiKey();
  if (key) headers.authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(`cannot reach the server at ${location.origin}: is \`binarylm serve\` still running?`, 0);
  }
  const text = await response.text();
  let payload = null;
  try {
    payload = JSON.parse(text);
  } catch {
    payload = null;
  }
  if (!response.ok) {
    const message = payload?.error?.message || `${response.status} ${response.statusText || 'error'}`;
    const hint = response.status === 401 ? ' (enter the server\'s API key in the field at the top)' : '';
    throw new ApiError(message + hint, response.status);
  }
  if (payload === null) throw new ApiError(`the server's answer to ${path} is not JSON`, response.status);
  return payload;
}

export const internals = (body) => call('/v1/internals', { method: 'POST', body });
export const checkpoints = () => call('/v1/explore/checkpoints');
export const curves = () => call('/v1/explore/curves');
export const embeddings = (checkpoint) =>
  call('/v1/explore/embeddings' + (checkpoint ? `?checkpoint=${encodeURIComponent(checkpoint)}` : ''));

// {"shape", "dtype": "float32", "data": base64} -> {shape, data: Float32Array}. Decoded once per payload.
const decoded = new WeakMap();

export function array(payload) {
  if (!payload) return null;
  if (!decoded.has(payload)) {
    const text = atob(payload.data);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    // The wire is little-endian float32, which is what typed arrays use on every machine browsers run on.
    decoded.set(payload, { shape: payload.shape, data: new Float32Array(bytes.buffer) });
  }
  return decoded.get(payload);
}
