// The live typing page: the text before the caret is fed to one session over /v1/stream.
//
// Whole words go to the session once (`{"text": "word"}`); the partly typed word goes as
// `prefix` on every keystroke (`{"text": "", "prefix": "wo"}`), which the server answers
// without changing the session. An edit before the last word fed resets the session and
// feeds the text again. One message is in flight at a time; keystrokes typed meanwhile
// are gathered into the next one.

import { DEFAULT_K, MAX_K, NextwordClient, prefixOf, splitTyping, tokenize, typingDelta } from "./nextword.js";

const $ = (id) => document.getElementById(id);
const text = $("text");
const chips = $("suggestions");
const live = $("suggestions-live");
const connection = $("connection");
const modelPicker = $("model");
const kInput = $("k");
const adaptInput = $("adapt");

const params = new URLSearchParams(location.search);
const client = new NextwordClient(location.origin, { accessToken: params.get("access_token") });
const PUNCTUATION = new Set([",", ".", "!", "?", ";", ":"]);

let stream = null;
let fed = null; // the text the session holds (sent), ending at a word boundary; null: unknown
let sent = null; // {complete, prefix, k, adapt} of the last message sent
let refused = null; // {complete, prefix, k, adapt} the server refused: not sent again as it is
let busy = false; // a message is in flight
let predictions = [];
let autoSpaceAt = -1; // caret position right after a space this page inserted
let tabReleased = false; // Esc pressed: the next Tab moves focus instead of accepting
let liveTimer = null;

// --- the session ---------------------------------------------------------------------------

function openStream(model) {
  const previous = stream;
  stream = null; // its last events are not this page's any more
  if (previous) previous.close();
  fed = null;
  sent = null;
  const current = client.stream({ model: model || null, k: currentK() });
  stream = current;
  current.addEventListener("state", (event) => {
    if (current === stream) showConnection(event.detail);
  });
  current.addEventListener("ready", (event) => {
    if (current !== stream) return;
    const { sessionId, model, tokens, resumed } = event.detail;
    if (!resumed) fed = tokens === 0 ? "" : null;
    else if (!busy && fed !== null && tokenize(fed).length !== tokens) fed = null; // moved on
    showSession(sessionId, model, tokens);
    sync();
  });
  current.addEventListener("lost", () => {
    // The server forgot the session (restarted without Redis, or it expired): start a
    // new one and feed it the whole text again.
    if (current === stream) setTimeout(() => openStream(modelPicker.value), 0);
  });
  current.open().catch(() => {});
}

function currentK() {
  const k = Number(kInput.value);
  return Number.isInteger(k) && k >= 1 && k <= MAX_K ? k : DEFAULT_K;
}

/** Send what the session lacks: new whole words, the current prefix, k. */
async function sync() {
  if (!stream || stream.state !== "open") return markStale(true);
  if (busy) return;
  const { complete, partial } = splitTyping(text.value.slice(0, text.selectionStart));
  const prefix = prefixOf(partial);
  const k = currentK();
  const adapt = adaptInput.checked; // mix in the writer's own words (sent with each message)
  const same = (m) => m && m.complete === complete && m.prefix === prefix && m.k === k && m.adapt === adapt;
  if ((same(sent) && fed === complete) || same(refused)) return markStale(false);
  busy = true;
  markStale(true);
  const current = stream;
  try {
    const delta = typingDelta(fed, complete);
    sent = { complete, prefix, k, adapt };
    let answer;
    if (delta !== null) {
      fed = complete;
      answer = await current.send({ text: delta, prefix, k, adapt });
    } else {
      // Not a continuation of what the session holds: start afresh, feed the whole text.
      fed = null;
      const words = complete.trim();
      answer = await current.reset({ k, prefix: words ? null : prefix });
      fed = complete;
      if (words) answer = await current.send({ text: words, prefix, k, adapt });
    }
    if (current === stream) showAnswer(answer, partial);
  } catch (error) {
    fed = null; // unknown after a failed message: the next sync resets
    sent = null;
    if (current === stream && error.status >= 400 && error.status < 500 && error.code !== "unknown_session") {
      refused = { complete, prefix, k, adapt }; // a bad text (too long...): wait for an edit
      showConnection({ state: "error", error: error.message });
    }
  } finally {
    busy = false;
  }
  if (current === stream) sync();
}

// --- what the page shows --------------------------------------------------------------------

function showConnection({ state, attempt, retryInMs, error, reason }) {
  connection.dataset.state = state;
  // The connection stays open while the server restarts its engine after a crash.
  const why = reason === "engine_restarting" ? "The server is restarting" : "Server unreachable";
  const messages = {
    connecting: "Connecting…",
    open: "Connected",
    reconnecting: `${why}: reconnecting in ${((retryInMs ?? 0) / 1000).toFixed(1)} s (attempt ${attempt ?? 1})…`,
    lost: "The server no longer knows this session: starting a new one with your text.",
    closed: `Disconnected${error ? `: ${error}` : ""}`,
    error: `Error: ${error}`,
  };
  connection.textContent = messages[state] ?? state;
  if (state !== "open") markStale(true);
}

function showSession(sessionId, model, tokens) {
  $("session-id").textContent = sessionId;
  $("session-model").textContent = model;
  $("tokens").textContent = String(tokens);
  if (modelPicker.value !== model && [...modelPicker.options].some((o) => o.value === model)) {
    modelPicker.value = model;
  }
}

function markStale(stale) {
  chips.setAttribute("aria-busy", String(stale));
}

/** A probability as a percentage with two significant digits (0.27%, 4.1%, 18%). */
function formatPercent(probability) {
  const percent = 100 * probability;
  if (percent >= 10) return `${percent.toFixed(0)}%`;
  if (percent >= 0.001) return `${percent.toPrecision(2)}%`;
  return "<0.001%";
}

function showAnswer(answer, partial) {
  refused = null;
  if (connection.dataset.state === "error") showConnection({ state: "open" });
  showSession(answer.sessionId, answer.model, answer.tokens);
  $("latency").textContent = `${answer.latencyMs.toFixed(1)} ms`;
  // The server writes each word as it would be typed there (sentence starts, names, the
  // prefix's capitals): shown as it comes.
  predictions = answer.predictions;
  const top = Math.max(...predictions.map((p) => p.probability), 1e-9);
  chips.replaceChildren(
    ...predictions.map((p, i) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = p.corrected ? "chip corrected" : "chip";
      button.dataset.word = p.word;
      const percent = formatPercent(p.probability);
      const note = p.corrected ? ", corrected" : "";
      button.setAttribute("aria-label", `${p.word}${note}, ${percent}${i === 0 ? ", Tab" : ""}`);
      if (p.corrected) button.title = `Corrected: “${partial}” looks like a slip for “${p.word}”`;
      const word = document.createElement("span");
      word.className = "word";
      word.textContent = p.word;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.setProperty("--share", String(p.probability / top));
      const probability = document.createElement("span");
      probability.className = "probability";
      probability.textContent = percent;
      button.append(word, bar, probability);
      button.addEventListener("click", () => accept(p.word));
      item.append(button);
      return item;
    }),
  );
  if (!predictions.length) {
    const empty = document.createElement("li");
    empty.className = "empty";
    empty.textContent = partial ? `No word starts with “${partial}”` : "No suggestion";
    chips.append(empty);
  }
  markStale(false);
  // Screen readers hear the suggestions once typing pauses, not on every keystroke.
  clearTimeout(liveTimer);
  liveTimer = setTimeout(() => {
    live.textContent = predictions.length ? `Suggestions: ${predictions.map((p) => p.word).join(", ")}` : "No suggestion";
  }, 400);
}

// --- editing, as a phone keyboard does it ------------------------------------------------

/** Replace the word at the caret by `word` and a space; the caret goes after the space. */
function accept(word) {
  const caret = text.selectionStart;
  const before = text.value.slice(0, caret);
  let after = text.value.slice(text.selectionEnd).replace(/^[\p{L}\p{N}'\u2019\-]+/u, "");
  const { complete } = splitTyping(before);
  const space = /^\s/u.test(after) ? "" : " ";
  text.value = complete + word + space + after;
  const end = complete.length + word.length + 1;
  text.setSelectionRange(end, end);
  autoSpaceAt = space ? end : -1;
  tabReleased = false;
  text.focus();
  sync();
}

function replaceBeforeCaret(count, insert) {
  const caret = text.selectionStart;
  text.setRangeText(insert, caret - count, text.selectionEnd, "end");
}

text.addEventListener("beforeinput", (event) => {
  const caret = text.selectionStart;
  const afterAutoSpace = caret === autoSpaceAt && caret === text.selectionEnd && text.value[caret - 1] === " ";
  if (!afterAutoSpace) return;
  if (event.inputType === "insertText" && PUNCTUATION.has(event.data)) {
    // "coming |" + "," becomes "coming, |": the mark attaches to the word before it.
    event.preventDefault();
    replaceBeforeCaret(1, `${event.data} `);
    autoSpaceAt = text.selectionStart;
    sync();
  } else if (event.inputType === "insertLineBreak") {
    event.preventDefault();
    replaceBeforeCaret(1, "\n");
    autoSpaceAt = -1;
    sync();
  }
});

text.addEventListener("input", () => {
  autoSpaceAt = -1;
  tabReleased = false;
  sync();
});

text.addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    tabReleased = true;
  } else if (event.key === "Tab" && !event.shiftKey && !event.altKey && !event.ctrlKey && !event.metaKey) {
    if (tabReleased || !predictions.length) return; // Tab moves focus as usual
    event.preventDefault();
    accept(predictions[0].word);
  }
});

// Moving the caret changes the text before it: the suggestions follow the caret.
document.addEventListener("selectionchange", () => {
  if (document.activeElement === text) sync();
});

// --- settings --------------------------------------------------------------------------------

kInput.addEventListener("input", () => sync());
adaptInput.addEventListener("change", () => sync());
$("forget").addEventListener("click", async () => {
  // The session forgets the words it learnt from this text; they come back only if typed again.
  const sessionId = stream?.sessionId;
  if (!sessionId) return;
  try {
    await client.forgetWords(sessionId);
    sent = null; // ask again: the suggestions change
  } catch (error) {
    showConnection({ state: "error", error: error.message });
  }
  text.focus();
  sync();
});
modelPicker.addEventListener("change", () => openStream(modelPicker.value));
$("clear").addEventListener("click", () => {
  text.value = "";
  autoSpaceAt = -1;
  text.focus();
  sync();
});
$("settings").addEventListener("submit", (event) => event.preventDefault());

async function loadModels() {
  for (let delay = 500; ; delay = Math.min(2 * delay, 5000)) {
    try {
      const { default: fallback, models } = await client.models();
      const chosen = params.get("model") || fallback;
      modelPicker.replaceChildren(
        ...models.map((m) => {
          const label = `${m.name} (${m.cell.toUpperCase()}, ${m.layers}×${m.hidden_size}, ${m.vocab_size.toLocaleString("en")} words)`;
          return new Option(label, m.name, m.name === chosen, m.name === chosen);
        }),
      );
      return;
    } catch {
      await new Promise((resolve) => setTimeout(resolve, delay)); // the stream shows the state
    }
  }
}

if (params.get("k")) kInput.value = params.get("k");
openStream(params.get("model"));
loadModels();
