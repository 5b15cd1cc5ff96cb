// The fastlm playground: chat and completion through the server's own OpenAI-compatible API.
// Replies stream as server-sent events read from fetch's body (EventSource cannot POST), from
// the same origin as this page. Model text is only ever set as text, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "fastlm.apiKey"; // sessionStorage: the key lives as long as the tab

const state = {
  model: null, // the model id from /v1/models, sent with every request
  history: [], // the chat's turns so far, {role, content}, without the system prompt
  controller: null, // the AbortController of the request in flight
  pending: null, // a request waiting for an API key (refused without one, or sent before one was given)
};

class AuthError extends Error {}

// ---------------------------------------------------------------------------- the API key
function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// The server answered 401: ask for a key (a stored one was refused, so it is dropped).
function askForKey() {
  const refused = apiKey() !== "";
  sessionStorage.removeItem(KEY_STORAGE);
  $("key-message").textContent = (refused
    ? "The server refused this API key. Enter the right one."
    : "This server needs an API key (sent as Authorization: Bearer).")
    + (state.pending ? " Your message is sent once a key is accepted." : "");
  $("key-form").hidden = false;
  $("key-forget").hidden = true;
  $("api-key").focus();
}

async function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  $("key-forget").hidden = false;
  if (await loadModel() && state.pending) {
    const job = state.pending;
    state.pending = null;
    run(job);
  }
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  $("key-forget").hidden = true;
}

// ---------------------------------------------------------------------------- the model
async function errorMessage(resp) {
  try {
    const body = await resp.json(); // OpenAI's shape: {"error": {"message", "type", "param", "code"}}
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) {
    // not JSON: the status line says it
  }
  return `HTTP ${resp.status} ${resp.statusText}`;
}

// The model id and context from /v1/models; false when the server refused or is unreachable.
async function loadModel() {
  let resp;
  try {
    resp = await fetch("v1/models", { headers: headers(false) });
  } catch (e) {
    $("model").textContent = "server unreachable";
    showError("Cannot reach the server: " + e.message);
    return false;
  }
  if (resp.status === 401) {
    $("model").textContent = "API key needed";
    askForKey();
    return false;
  }
  if (!resp.ok) {
    showError(await errorMessage(resp));
    return false;
  }
  const m = (await resp.json()).data[0];
  state.model = m.id;
  $("model").textContent = `${m.id} · context ${m.max_model_len}`;
  if (apiKey()) $("key-forget").hidden = false;
  showError("");
  return true;
}

// ---------------------------------------------------------------------------- the settings
const NUMBERS = [
  // [field id, API name, integer?]
  ["temperature", "temperature", false],
  ["top_p", "top_p", false],
  ["top_k", "top_k", true],
  ["min_p", "min_p", false],
  ["max_tokens", "max_tokens", true],
  ["repetition_penalty", "repetition_penalty", false],
  ["presence_penalty", "presence_penalty", false],
  ["frequency_penalty", "frequency_penalty", false],
  ["seed", "seed", true],
];

// A stop sequence as typed: \n, \t and \\ stand for a newline, a tab and a backslash.
function unescapeStop(s) {
  return s.replace(/\\(n|t|\\)/g, (_, c) => (c === "n" ? "\n" : c === "t" ? "\t" : "\\"));
}

// The request's sampling fields from the form; an empty field is left to the server's default.
// Throws an Error naming the field whose text is not a number. The server checks the ranges.
function samplingParams() {
  const params = {};
  for (const [id, name, integer] of NUMBERS) {
    const input = $(id);
    const label = input.parentElement.firstChild.textContent.trim();
    if (input.validity.badInput) throw new Error(`${label} must be a number`);
    if (input.value === "") continue;
    const v = Number(input.value);
    if (!Number.isFinite(v) || (integer && !Number.isSafeInteger(v))) {
      throw new Error(`${label} must be ${integer ? "an integer" : "a number"}, got ${input.value}`);
    }
    params[name] = v;
  }
  const stop = $("stop_sequences").value.split("\n").filter((s) => s !== "").map(unescapeStop);
  if (stop.length) params.stop = stop;
  return params;
}

// ---------------------------------------------------------------------------- server-sent events
// The JSON objects of a response's `data:` events until `data: [DONE]`. An event carrying
// OpenAI's error shape (the server's way to fail a stream already begun) throws.
async function* events(resp) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop(); // an incomplete line waits for the next chunk
    for (let line of lines) {
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") { // a blank line ends an event
        if (!data.length) continue;
        const payload = data.join("\n");
        data = [];
        if (payload === "[DONE]") return;
        const obj = JSON.parse(payload);
        if (obj.error) throw new Error(obj.error.message || "the server failed the request");
        yield obj;
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      } // other fields (event:, id:, retry:) and comments (":") are not used by this server
    }
  }
}

// ---------------------------------------------------------------------------- a request
function mode() {
  return $("mode-completion").checked ? "completion" : "chat";
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "bubble " + role;
  div.textContent = text;
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function showStats(reason, tokens, t0, tFirst, tEnd) {
  $("finish").textContent = `finish: ${reason}`;
  $("finish").dataset.reason = reason;
  const secs = (tEnd - t0) / 1000;
  let text = `${tokens} token${tokens === 1 ? "" : "s"} in ${secs.toFixed(2)} s`;
  if (tokens > 0 && secs > 0) text += ` · ${(tokens / secs).toFixed(1)} tokens/s`;
  if (tFirst !== null) text += ` · first token after ${Math.round(tFirst - t0)} ms`;
  $("speed").textContent = text;
}

// The request of `job` ({mode, text, params}): its body, and where its text is shown.
function prepare(job) {
  const body = { model: state.model, stream: true, stream_options: { include_usage: true }, ...job.params };
  if (job.mode === "chat") {
    const system = $("system").value.trim();
    body.messages = [
      ...(system ? [{ role: "system", content: system }] : []),
      ...state.history,
      { role: "user", content: job.text },
    ];
    $("prompt").value = "";
    const user = bubble("user", job.text);
    const out = bubble("assistant", "");
    // a reply is shown, and kept in the history, without the white space around it (the
    // template puts its own between turns)
    const delta = (choice) => {
      const text = (choice.delta && choice.delta.content) || "";
      return out.textContent ? text : text.trimStart();
    };
    const done = () => { out.textContent = out.textContent.trimEnd(); };
    return { url: "v1/chat/completions", body, out, shown: [user, out], delta, done };
  }
  body.prompt = job.text;
  $("completion-prompt").textContent = job.text;
  $("completion-text").textContent = "";
  return { url: "v1/completions", body, out: $("completion-text"), shown: [],
           delta: (choice) => choice.text || "", done: () => {} };
}

async function run(job) {
  const req = prepare(job);
  const controller = (state.controller = new AbortController());
  setBusy(true);
  showError("");
  $("finish").textContent = "";
  delete $("finish").dataset.reason;
  $("speed").textContent = "";
  req.out.classList.add("streaming");
  const t0 = performance.now();
  let tFirst = null;
  let reason = null;
  let usage = null;
  let chunks = 0;
  let started = false; // the server accepted the request: what it streamed stays shown
  try {
    const resp = await fetch(req.url, { method: "POST", headers: headers(true), body: JSON.stringify(req.body),
                                        signal: controller.signal });
    if (resp.status === 401) {
      state.pending = job;
      throw new AuthError("an API key is needed");
    }
    if (!resp.ok) throw new Error(await errorMessage(resp));
    started = true;
    for await (const chunk of events(resp)) {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const text = req.delta(choice);
        if (text) {
          if (tFirst === null) tFirst = performance.now();
          chunks += 1;
          req.out.append(text);
        }
        if (choice.finish_reason) reason = choice.finish_reason;
      }
    }
    showStats(reason || "unknown", usage ? usage.completion_tokens : chunks, t0, tFirst, performance.now());
  } catch (e) {
    if (e.name === "AbortError") {
      showStats("stopped", chunks, t0, tFirst, performance.now());
    } else if (e instanceof AuthError) {
      askForKey();
    } else {
      showError(e.message);
    }
  } finally {
    req.out.classList.remove("streaming");
    req.done();
    if (job.mode === "chat") {
      if (started) {
        state.history.push({ role: "user", content: job.text },
                           { role: "assistant", content: req.out.textContent });
      } else { // refused: the turn is taken back, its text returned to the prompt box
        req.shown.forEach((el) => el.remove());
        if (!$("prompt").value) $("prompt").value = job.text;
      }
    }
    state.controller = null;
    setBusy(false);
  }
}

async function send(event) {
  if (event) event.preventDefault();
  if (state.controller) return; // one request at a time
  const text = $("prompt").value;
  if (mode() === "chat" && !text.trim()) return;
  let params;
  try {
    params = samplingParams();
  } catch (e) {
    showError(e.message);
    return;
  }
  const job = { mode: mode(), text, params };
  if (!state.model) { // the model is not known yet: the job waits for it (and for a key, if one is asked for)
    state.pending = job;
    if (!(await loadModel())) return;
    state.pending = null;
  }
  run(job);
}

function stop() {
  if (state.controller) state.controller.abort();
}

function clearAll() {
  stop();
  state.history = [];
  $("messages").replaceChildren();
  $("completion-prompt").textContent = "";
  $("completion-text").textContent = "";
  $("finish").textContent = "";
  delete $("finish").dataset.reason;
  $("speed").textContent = "";
  showError("");
}

function switchMode() {
  stop();
  const chat = mode() === "chat";
  $("chat-panel").hidden = !chat;
  $("completion-panel").hidden = chat;
  $("prompt").placeholder = chat
    ? "Type a message (Enter sends, Shift+Enter adds a line)"
    : "Type the text to continue (Ctrl+Enter sends)";
}

function onPromptKey(event) {
  if (event.key !== "Enter" || event.isComposing) return;
  if (mode() === "chat" ? !event.shiftKey : event.ctrlKey || event.metaKey) send(event);
}

document.addEventListener("DOMContentLoaded", () => {
  $("prompt-form").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", onPromptKey);
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clearAll);
  $("key-form").addEventListener("submit", useKey);
  $("key-forget").addEventListener("click", forgetKey);
  $("mode-chat").addEventListener("change", switchMode);
  $("mode-completion").addEventListener("change", switchMode);
  setBusy(false);
  switchMode();
  loadModel();
});
