// Calls to the /v1 API with the session's bearer token. Errors are the API's own
// `{"error":{"code","message"}}`, raised as ApiError; a 401 ends the session.

const TOKEN_KEY = 'cloudai.token';

export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  set token(value) { sessionStorage.setItem(TOKEN_KEY, value); },
  clear() { sessionStorage.removeItem(TOKEN_KEY); },
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let unauthorized = () => {};

/** Called with the API's message when a call is answered 401. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body?.error?.code) return new ApiError(response.status, body.error.code, body.error.message);
  } catch { /* not the API's JSON: described below */ }
  return new ApiError(response.status, `http_${response.status}`, `${response.status} ${response.statusText}`.trim());
}

/**
 * `request('POST', '/v1/tasks', {json: spec})` -> the decoded body. With `raw: true` the
 * Response itself (for streams), once its status is a success.
 */
export async function request(method, path, { json, body, headers = {}, signal, raw = false, token } = {}) {
  const sent = { Authorization: `Bearer ${token ?? session.token ?? ''}`, ...headers };
  if (json !== undefined) {
    sent['Content-Type'] = 'application/json';
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers: sent, body, signal, cache: 'no-store' });
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new ApiError(0, 'unreachable', `the host did not answer (${error.message})`);
  }
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401 && token === undefined) unauthorized(error.message);
    throw error;
  }
  if (raw) return response;
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

export const api = {
  get: (path, options) => request('GET', path, options),
  post: (path, json, options) => request('POST', path, { ...options, json }),
  del: (path, options) => request('DELETE', path, options),
};

/** `/v1/tasks?status=x` with the empty values left out. */
export function withQuery(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') q.set(k, v);
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}
