// nextword.js: a dependency-free client of the nextword API for browsers (an ES module).
//
//   import { NextwordClient } from "/static/nextword.js";
//   const client = new NextwordClient();                 // this page's server
//   (await client.predict("I am coming")).predictions;   // [{word: "to", probability: 0.2, corrected: false}, ...]
//   const stream = client.stream({ k: 5 });              // one session over /v1/stream
//   await stream.open();
//   const answer = await stream.send({ text: "I am", prefix: "co" });
//
// A stream reconnects by itself when its connection drops and continues the same session
// (`session_id`); a message whose answer was lost is sent again only if the session's
// token count shows it was not applied. It reports its state with "state" events and
// a session the server forgot with a "lost" event. While the server's engine process restarts
// after a crash, a message answered `engine_restarting` is sent again with back-off on the
// same connection (state "reconnecting", reason "engine_restarting"); when the answer says it
// may have been applied, an empty text is sent first and its token count tells whether it
// was. The tokenizer mirrors the server's
// (service/contract/tokenizer.py) so that token counts can be compared.

export const DEFAULT_K = 5;
export const MAX_K = 50;

const RETRY_CODES = new Set(["not_ready", "engine_restarting", "overloaded", "store_unavailable", "contended", "step_failed", "internal"]);
const RESTARTING = "engine_restarting";
const CLOSE_TOO_BIG = 1009;
const CLOSE_TRY_AGAIN = 1013;

/** An error answered by the server: `status` (HTTP, or the equivalent), `code`, `message`. */
export class NextwordError extends Error {
  constructor(status, code, message, details = {}) {
    super(`${code}: ${message}`);
    this.name = "NextwordError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

// The HTTP status of each error code, for errors that come in-band on the WebSocket.
const STATUS_OF_CODE = {
  bad_input: 422,
  unauthorized: 401,
  unknown_model: 404,
  unknown_session: 404,
  rate_limited: 429,
  step_failed: 500,
  internal: 500,
  overloaded: 503,
  store_unavailable: 503,
  contended: 503,
  not_ready: 503,
  engine_restarting: 503,
};

function errorOf(status, error) {
  const { code = "error", message = "", ...details } = error || {};
  return new NextwordError(status || STATUS_OF_CODE[code] || 400, code, message, details);
}

// --- the tokenizer (a mirror of service/contract/tokenizer.py) ----------------------------

const TOKEN = /([\p{L}\p{N}]+(?:['\-][\p{L}\p{N}]+)*)|([.!?\u2026]+)|([,;:])/gu;
export const EOS = "</s>";

/** Normalise like the server: NFKC, lower case, curly apostrophes made straight. */
export function normalize(text) {
  return text.normalize("NFKC").toLowerCase().replaceAll("\u2019", "'");
}

/** The tokens of a text: words, `, ; :`, and `</s>` for each run of `. ! ? …`. */
export function tokenize(text) {
  const tokens = [];
  for (const match of normalize(text).matchAll(TOKEN)) {
    tokens.push(match[1] ?? (match[2] !== undefined ? EOS : match[3]));
  }
  return tokens;
}

// --- typing: from an edited text to stream messages -------------------------------------

const PARTIAL_WORD = /[\p{L}\p{N}'\u2019\-]*$/u;
const SENTENCE_END = /[.!?\u2026]$/u;

/** Split the text before the caret into whole words (`complete`) and the word being typed. */
export function splitTyping(text) {
  const partial = text.match(PARTIAL_WORD)[0];
  return { complete: text.slice(0, text.length - partial.length), partial };
}

/** The prefix to send for a partly typed word: leading apostrophes or hyphens are dropped. */
export function prefixOf(partial) {
  return partial.replace(/^['\u2019\-]+/u, "");
}

/**
 * What to feed a session that holds `fed` so that it holds `complete` (both end at a word
 * boundary): the new text, or null when `complete` does not continue `fed` (reset first).
 * A run of sentence punctuation continuing one already fed stays one end-of-sentence token.
 */
export function typingDelta(fed, complete) {
  if (fed === null || !complete.startsWith(fed)) return null;
  let delta = complete.slice(fed.length);
  if (SENTENCE_END.test(fed)) delta = delta.replace(/^[.!?\u2026]+/u, "");
  return delta.trim();
}

/** Whether a word typed after `complete` starts a sentence (a keyboard capitalises it). */
export function startsSentence(complete) {
  return /^\s*$/u.test(complete) || /[.!?\u2026]["'\u201d)\]]*\s+$/u.test(complete);
}

// --- Prometheus text, for the operations view --------------------------------------------

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

/** The samples of a Prometheus text exposition: [{name, labels, value}]. */
export function parsePrometheus(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = SAMPLE.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(LABEL)) {
      labels[key] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

/** The q-quantile of cumulative histogram buckets [[le, count]], as Prometheus estimates it. */
export function histogramQuantile(q, buckets) {
  const sorted = [...buckets].sort((a, b) => a[0] - b[0]);
  const total = sorted.length ? sorted[sorted.length - 1][1] : 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const [le, count] of sorted) {
    if (count >= rank) {
      if (le === Infinity) return lower; // past the last finite bound: that bound is all we know
      return lower + ((le - lower) * (rank - below)) / Math.max(count - below, 1e-12);
    }
    lower = le;
    below = count;
  }
  return lower;
}

// --- REST ---------------------------------------------------------------------------------

/** Client of the REST API; `stream()` opens a WebSocket session. */
export class NextwordClient {
  constructor(baseUrl = globalThis.location?.origin ?? "http://127.0.0.1:8000", { accessToken = null } = {}) {
    this.baseUrl = baseUrl.replace(/\/$/, "");
    this.accessToken = accessToken;
  }

  async call(method, path, body) {
    const headers = {};
    if (body !== undefined) headers["content-type"] = "application/json";
    if (this.accessToken) headers.authorization = `Bearer ${this.accessToken}`;
    const response = await fetch(this.baseUrl + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 204) return null;
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw errorOf(response.status, answer.error);
    return answer;
  }

  models() {
    return this.call("GET", "/v1/models");
  }

  // `adapt`: mix the writer's own words into the answer (null: the session's or service's default).
  predict(text, { k = DEFAULT_K, model = null, prefix = null, adapt = null } = {}) {
    return this.call("POST", "/v1/predict", withoutNulls({ text, k, model, prefix, adapt }));
  }

  createSession(text = "", { k = DEFAULT_K, model = null, prefix = null, adapt = null } = {}) {
    return this.call("POST", "/v1/sessions", withoutNulls({ text, k, model, prefix, adapt }));
  }

  feed(sessionId, text, { k = DEFAULT_K, prefix = null, adapt = null } = {}) {
    return this.call("POST", `/v1/sessions/${encodeURIComponent(sessionId)}/feed`, withoutNulls({ text, k, prefix, adapt }));
  }

  /** Forget the words a session remembers of its writer (its context stays). */
  forgetWords(sessionId) {
    return this.call("DELETE", `/v1/sessions/${encodeURIComponent(sessionId)}/memory`);
  }

  session(sessionId) {
    return this.call("GET", `/v1/sessions/${encodeURIComponent(sessionId)}`);
  }

  deleteSession(sessionId) {
    return this.call("DELETE", `/v1/sessions/${encodeURIComponent(sessionId)}`);
  }

  /** The Prometheus text of `/metrics`. */
  async metrics() {
    const response = await fetch(this.baseUrl + "/metrics", { cache: "no-store" });
    if (!response.ok) throw new NextwordError(response.status, "http_error", response.statusText);
    return response.text();
  }

  stream(options = {}) {
    return new NextwordStream(this.baseUrl, { accessToken: this.accessToken, ...options });
  }
}

function withoutNulls(fields) {
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== null && value !== undefined));
}

// --- the stream ---------------------------------------------------------------------------

/**
 * One session over `/v1/stream`. Events: "state" ({state, attempt, retryInMs, error}),
 * "ready" (the session's answer on each connect, {resumed}), "lost" (the server forgot the
 * session: its text must be sent again to a new one). States: "connecting", "open",
 * "reconnecting", "closed".
 */
export class NextwordStream extends EventTarget {
  constructor(baseUrl, { model = null, k = DEFAULT_K, sessionId = null, accessToken = null, maxBackoffMs = 3000, adapt = null } = {}) {
    super();
    this.baseUrl = baseUrl.replace(/\/$/, "");
    this.model = model;
    this.adapt = adapt;
    this.k = k;
    this.sessionId = sessionId;
    this.accessToken = accessToken;
    this.maxBackoffMs = maxBackoffMs;
    this.tokens = 0;
    this.state = "closed";
    this.reconnects = 0;
    this._ws = null;
    this._queue = []; // messages waiting to be sent, one at a time
    this._inflight = null; // the message sent and not yet answered
    this._ids = 0;
    this._attempt = 0;
    this._timer = null;
    this._retryTimer = null; // a message waiting to be sent again (engine restarting)
    this._opened = null;
  }

  get url() {
    const url = new URL("/v1/stream", this.baseUrl);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const query = withoutNulls({ model: this.model, k: this.k, session_id: this.sessionId, adapt: this.adapt, access_token: this.accessToken });
    for (const [key, value] of Object.entries(query)) url.searchParams.set(key, String(value));
    return url.href;
  }

  /** Connect; resolves with the first `ready` answer. */
  open() {
    if (!this._opened) {
      this._opened = new Promise((resolve, reject) => {
        this._resolveOpen = resolve;
        this._rejectOpen = reject;
      });
      this._connect();
    }
    return this._opened;
  }

  /** Feed whole words (may be empty); `prefix` is the partly typed next word. */
  send({ text = "", prefix = null, k = null, adapt = null } = {}) {
    return this._enqueue(withoutNulls({ text, prefix, k, adapt }));
  }

  /** Start the session's text afresh. */
  reset({ prefix = null, k = null } = {}) {
    return this._enqueue(withoutNulls({ type: "reset", prefix, k }));
  }

  close() {
    this._setState("closed");
    clearTimeout(this._timer);
    clearTimeout(this._retryTimer);
    if (this._ws) this._ws.close(1000);
    this._ws = null;
    this._failAll(new NextwordError(0, "closed", "the stream was closed"));
  }

  _enqueue(message) {
    return new Promise((resolve, reject) => {
      this._queue.push({ message, resolve, reject, before: null });
      this._pump();
    });
  }

  _setState(state, detail = {}) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, ...detail } }));
  }

  _connect() {
    clearTimeout(this._timer);
    if (this.state === "closed") this._setState("connecting");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (error) {
      this._fatal(new NextwordError(0, "bad_url", String(error)));
      return;
    }
    this._ws = ws;
    let ready = false;
    ws.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (!ready) {
        ready = true;
        this._onFirstMessage(message);
      } else {
        this._onAnswer(message);
      }
    };
    ws.onclose = (event) => {
      if (this._ws !== ws || this.state === "closed" || this.state === "lost") return;
      this._ws = null;
      if (event.code === 4404) {
        this._lost(new NextwordError(404, "unknown_session", "the server does not know this session"));
        return;
      }
      if (event.code >= 4000 && event.code < 5000) {
        this._fatal(new NextwordError(event.code - 4000, event.reason || "refused", `closed with ${event.code}`));
        return;
      }
      if (event.code === CLOSE_TOO_BIG && this._inflight) {
        // The message itself ended the connection: fail it (never resend it), keep the session.
        const item = this._inflight;
        this._inflight = null;
        item.reject(new NextwordError(413, "too_large", "the message is over the server's size limit"));
      }
      this._scheduleReconnect(event.code === CLOSE_TRY_AGAIN ? "the server is busy or starting" : "server unreachable");
    };
  }

  _onFirstMessage(message) {
    if (message.type !== "ready") {
      const error = errorOf(0, message.error);
      if (error.code === "unknown_session") this._lost(error);
      else if (!RETRY_CODES.has(error.code)) this._fatal(error);
      return; // a retryable error: the close that follows schedules the reconnect
    }
    const resumed = this.sessionId !== null && this.sessionId === message.session_id;
    if (resumed && this.state !== "connecting") this.reconnects += 1;
    this.sessionId = message.session_id;
    this.model = message.model;
    this.tokens = message.tokens;
    this._attempt = 0;
    if (this._inflight) this._resume(); // before anyone can send on the new connection
    this._setState("open");
    const answer = { sessionId: message.session_id, model: message.model, tokens: message.tokens, predictions: message.predictions, resumed };
    this.dispatchEvent(new CustomEvent("ready", { detail: answer }));
    if (this._resolveOpen) {
      this._resolveOpen(answer);
      this._resolveOpen = this._rejectOpen = null;
    }
    this._pump();
  }

  // The answer to the message in flight was lost with the connection: compare the
  // session's token count to tell whether it was applied.
  _resume() {
    const item = this._inflight;
    this._inflight = null;
    item.probe = false; // the ready answer's token count tells already
    const added = item.message.type === "reset" ? 0 : tokenize(item.message.text || "").length;
    if (item.message.type !== "reset" && this.tokens !== item.before) {
      if (this.tokens !== item.before + added) {
        item.reject(new NextwordError(0, "diverged", `the session holds ${this.tokens} tokens, expected ${item.before} or ${item.before + added}`));
        return;
      }
      item.message = { ...item.message, text: "" }; // applied: only its predictions are missing
    }
    item.before = this.tokens;
    this._queue.unshift(item);
  }

  _onAnswer(message) {
    const item = this._inflight;
    if (!item || message.id !== item.id) return;
    if (message.type === "error" && message.error?.code === RESTARTING) {
      this._retryLater(item, errorOf(0, message.error));
      return;
    }
    this._inflight = null;
    if (message.type === "error") {
      const error = errorOf(0, message.error);
      item.reject(error);
      if (error.code === "unknown_session") this._lost(error);
    } else {
      if (item.probe) {
        // The answer to an empty text: the token count tells whether the message was applied.
        item.probe = false;
        const added = tokenize(item.message.text || "").length;
        if (message.tokens === item.before) {
          this._queue.unshift(item); // not applied: send it again
          this._pump();
          return;
        }
        if (message.tokens !== item.before + added) {
          item.reject(new NextwordError(0, "diverged", `the session holds ${message.tokens} tokens, expected ${item.before} or ${item.before + added}`));
          this._pump();
          return;
        }
        // Applied before the engine died: this answer is its answer.
      }
      this.tokens = message.tokens;
      item.resolve({
        sessionId: message.session_id,
        model: this.model,
        tokens: message.tokens,
        predictions: message.predictions,
        latencyMs: performance.now() - item.sentAt,
      });
    }
    this._pump();
  }

  _pump() {
    if (this.state !== "open" || this._inflight || !this._queue.length || !this._ws) return;
    const item = this._queue.shift();
    item.id = ++this._ids;
    if (item.before === null) item.before = this.tokens;
    item.sentAt = performance.now();
    this._inflight = item;
    const message = item.probe ? { ...item.message, text: "" } : item.message;
    this._ws.send(JSON.stringify({ ...message, id: item.id }));
  }

  // The server's engine is restarting: send the message again after a back-off, on the same
  // connection (asking first, when it may have been applied, whether it was).
  _retryLater(item, error) {
    item.retries = (item.retries || 0) + 1;
    const advised = error.details.retry_after_ms ?? 1000;
    const delay = Math.min(Math.max(advised, 250 * 2 ** (item.retries - 1)), Math.max(advised, this.maxBackoffMs)) * (0.8 + 0.4 * Math.random());
    item.probe = Boolean(error.details.maybe_applied) && item.message.type !== "reset" && Boolean(item.message.text);
    this._setState("reconnecting", { attempt: item.retries, retryInMs: delay, error: error.message, reason: RESTARTING });
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => {
      if (this._inflight !== item || this.state !== "reconnecting" || !this._ws) return; // closed, lost or dropped meanwhile
      this._inflight = null;
      this._queue.unshift(item);
      this._setState("open");
      this._pump();
    }, delay);
  }

  _scheduleReconnect(reason) {
    const delay = Math.min(250 * 2 ** this._attempt, this.maxBackoffMs) * (0.8 + 0.4 * Math.random());
    this._attempt += 1;
    this._setState("reconnecting", { attempt: this._attempt, retryInMs: delay, error: reason });
    this._timer = setTimeout(() => this._connect(), delay);
  }

  _lost(error) {
    this._setState("lost", { error: error.message });
    if (this._ws) this._ws.close(1000);
    this._ws = null;
    this._failAll(error);
    this.dispatchEvent(new CustomEvent("lost", { detail: { sessionId: this.sessionId, error } }));
  }

  _fatal(error) {
    this._setState("closed", { error: error.message });
    if (this._ws) this._ws.close(1000);
    this._ws = null;
    this._failAll(error);
  }

  _failAll(error) {
    const items = [...(this._inflight ? [this._inflight] : []), ...this._queue];
    this._inflight = null;
    this._queue = [];
    for (const item of items) item.reject(error);
    if (this._rejectOpen) {
      this._rejectOpen(error);
      this._resolveOpen = this._rejectOpen = null;
    }
  }
}
