// servelm playground: streams an answer from this server's OpenAI API and shows, per answer,
// the time to first token and the decode speed while the tokens arrive. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // {role, content} so far (chat mode); the system prompt is added per request
let inFlight = null;      // AbortController of the answer being streamed
const SETTINGS = ["mode", "system", "temperature", "top_p", "max_tokens", "seed", "api_key"];

function setStatus(text, bad = false) {
  $("status").textContent = text;
  $("status").classList.toggle("bad", bad);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  const body = await response.json().catch(() => ({}));
  return (body.error && body.error.message) || `HTTP ${response.status}`;
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const { data } = await response.json();
    $("model").replaceChildren(...data.map((m) => new Option(`${m.id} (${m.max_model_len} tokens)`, m.id)));
    setStatus(`ready: ${data.length} model${data.length === 1 ? "" : "s"}`);
  } catch (e) {
    setStatus("cannot list models: " + e.message, true);
  }
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text; // never innerHTML: model output is untrusted
  box.append(label, body);
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function samplingParams() {
  const p = {
    stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  if ($("model").value) p.model = $("model").value;
  if ($("seed").value !== "") p.seed = Number($("seed").value);
  return p;
}

// The `data:` payloads of a server-sent event stream, parsed, until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// "TTFT 120 ms · 35.2 tok/s · 64 tokens · length": decode speed counts the tokens after the first.
function statsLine(start, first, last, tokens, finish) {
  const parts = [];
  if (first) parts.push(`TTFT ${Math.round(first - start)} ms`);
  if (tokens > 1 && last > first) parts.push(`${((tokens - 1) * 1000 / (last - first)).toFixed(1)} tok/s`);
  parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
  if (finish) parts.push(finish);
  return parts.join(" · ");
}

function request(mode, text) {
  const system = $("system").value.trim();
  if (mode === "completion") {
    return ["/v1/completions", { ...samplingParams(), prompt: system ? `${system}\n${text}` : text }];
  }
  const messages = system ? [{ role: "system", content: system }] : [];
  return ["/v1/chat/completions", { ...samplingParams(), messages: messages.concat(conversation) }];
}

async function send(text) {
  const mode = $("mode").value;
  addMessage("user", text);
  if (mode === "chat") conversation.push({ role: "user", content: text });
  const box = addMessage("assistant", "");
  const body = box.querySelector(".text");
  const stats = document.createElement("span");
  stats.className = "stats";
  box.append(stats);
  box.dataset.state = "streaming";

  const [url, payload] = request(mode, text);
  inFlight = new AbortController();
  setBusy(true);
  const start = performance.now();
  let first = 0, last = 0, pieces = 0, usage = null, finish = null, reply = "";
  try {
    const response = await fetch(url, {
      method: "POST", headers: headers(), body: JSON.stringify(payload), signal: inFlight.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = mode === "chat" ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        if (piece) {
          last = performance.now();
          first = first || last;
          pieces += 1;
          reply += piece;
          body.textContent = reply;
        }
        finish = choice.finish_reason || finish;
      }
      stats.textContent = statsLine(start, first, last, pieces, null);
      box.scrollIntoView({ block: "end" });
    }
    // The usage chunk has the exact count; a streamed piece may hold several tokens.
    stats.textContent = statsLine(start, first, last, usage ? usage.completion_tokens : pieces, finish);
    box.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      stats.textContent = statsLine(start, first, last, pieces, "stopped");
      box.dataset.state = "done";
    } else {
      box.classList.add("error");
      body.textContent = (reply ? reply + "\n" : "") + "Error: " + e.message;
      box.dataset.state = "error";
    }
  } finally {
    if (mode === "chat") {
      if (reply) conversation.push({ role: "assistant", content: reply });
      else conversation.pop(); // nothing came back: the question leaves the history too
    }
    inFlight = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function linkRange(name) {
  const range = $(name + "-range"), box = $(name);
  range.addEventListener("input", () => { box.value = range.value; save(); });
  box.addEventListener("input", () => { range.value = box.value; });
  range.value = box.value;
}

function save() {
  for (const name of SETTINGS) localStorage.setItem("servelm." + name, $(name).value);
}

function restore() {
  for (const name of SETTINGS) {
    const value = localStorage.getItem("servelm." + name);
    if (value !== null) $(name).value = value;
  }
}

restore();
linkRange("temperature");
linkRange("top_p");
for (const name of SETTINGS) $(name).addEventListener("change", save);
$("api_key").addEventListener("change", loadModels);
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || inFlight) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => inFlight && inFlight.abort());
$("clear").addEventListener("click", () => {
  conversation.length = 0;
  $("messages").replaceChildren();
});
loadModels();
