// helios live page: start a job over the WebSocket, play its frames as they arrive, steer it.
// Protocol: see docs/serving.md (and helios/serve/protocol.py). No build step, no dependencies.
"use strict";

const FRAME_MAGIC = 0x3146_4c48; // "HLF1" read as a little-endian uint32
const HEADER_BYTES = 12;
const DECODE_AHEAD = 48; // decoded frames kept ready; the rest wait as small JPEG blobs

const $ = (id) => document.getElementById(id);

// Everything the page knows; exposed as window.helios for debugging and the browser test.
const S = {
  config: null, ws: null, job: null, state: "idle", done: true,
  fps: 24, queue: [], received: 0, shown: 0, chunkPrompts: {}, nextDue: 0, playingChunk: null,
};
window.helios = S;

// ---- access token: /?token=T once, then a same-site cookie carries it (fetch, WebSocket, downloads)
(function takeToken() {
  const url = new URL(location.href);
  const token = url.searchParams.get("token");
  if (token) {
    document.cookie = `helios_token=${encodeURIComponent(token)}; path=/; SameSite=Strict`;
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
})();

function log(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  $("log").prepend(li);
  while ($("log").children.length > 60) $("log").lastChild.remove();
}

function showError(text) { $("error").textContent = text || ""; }

async function loadConfig() {
  const r = await fetch("/api/config", { credentials: "same-origin" });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    $("server-info").textContent = "not connected";
    showError(body.error || `the server answered ${r.status}`);
    $("start").disabled = true;
    return;
  }
  S.config = body;
  S.fps = body.fps;
  const engines = body.engines || [];
  const where = engines.length > 1 || body.devices_per_engine > 1
    ? `${engines.length} engine(s) of ${body.devices_per_engine} device(s)` : body.device;
  $("server-info").textContent = `${body.model || "model"} on ${where} · ${body.queued} queued`;
  for (const name of body.presets) {
    const o = document.createElement("option");
    o.value = name; o.textContent = name + (name === body.default_preset ? " (default)" : "");
    o.selected = name === body.default_preset;
    $("preset").append(o);
  }
  if (body.example_prompt) $("prompt").placeholder = body.example_prompt;  // a prompt this model knows
  $("height").value = body.default_size[0];
  $("width").value = body.default_size[1];
  $("frames").max = body.limits.max_frames;
  $("preview").disabled = !body.preview;
  if (body.preview) $("preview-hint").textContent = "(live frames from the tiny decoder, the mp4 from the full VAE at the end)";
  lengthHint();
}

function lengthHint() {
  const n = parseInt($("frames").value, 10) || 0;
  const chunks = Math.ceil(n / 33);
  $("length-hint").textContent = n > 0 ? `${chunks} chunk(s), ${(n / S.fps).toFixed(1)} s` : "";
}

function modeHint() {
  const f = $("upload").files[0];
  $("mode").textContent = !f ? "text-to-video" : f.type.startsWith("video/")
    ? `video-to-video from ${f.name}` : `image-to-video from ${f.name}`;
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

// ---- a session -------------------------------------------------------------------------------
async function start(event) {
  event.preventDefault();
  showError("");
  if (S.ws) S.ws.close();
  const file = $("upload").files[0] || null;
  const message = {
    type: "start", prompt: $("prompt").value, frames: numberOrNull("frames"), preset: $("preset").value || null,
    height: numberOrNull("height"), width: numberOrNull("width"), seed: numberOrNull("seed"),
    steps: numberOrNull("steps"), fast_start: $("fast_start").checked, preview: $("preview").checked,
    upload: file ? (file.type.startsWith("video/") ? "video" : "image") : null, filename: file ? file.name : null,
  };
  if (!message.prompt.trim()) { showError("Write a prompt first."); return; }
  const payload = file ? await file.arrayBuffer() : null;

  resetPlayer();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  S.ws = ws; S.done = false;
  setState("connecting");
  ws.onopen = () => {
    ws.send(JSON.stringify(message));
    if (payload) ws.send(payload);
  };
  ws.onmessage = (e) => (typeof e.data === "string" ? onJson(JSON.parse(e.data)) : onFrame(e.data));
  ws.onclose = (e) => {
    if (ws !== S.ws) return;
    if (!S.done) { setState("disconnected"); log(`connection closed (${e.code}${e.reason ? " " + e.reason : ""})`); }
    S.done = true;
    controls(false);
  };
}

function onJson(m) {
  switch (m.type) {
    case "accepted":
      S.job = m.job;
      $("player").width = m.params.width; $("player").height = m.params.height;
      log(`job accepted: ${m.params.frames} frames in ${m.params.chunks} chunk(s), ${m.params.mode}`);
      $("st-decoder").textContent = m.params.decoder === "tiny" ? "tiny (preview)" : "full VAE";
      controls(true);
      status(m);
      break;
    case "status": status(m); break;
    case "chunk":
      S.chunkPrompts[m.index] = m.prompt;
      log(`${m.complete ? "chunk" : "first frame of chunk"} ${m.index + 1}/${m.total_chunks} decoded in ${m.seconds.toFixed(2)} s: "${m.prompt}"`);
      break;
    case "steered": log(`prompt "${m.prompt}" applies from chunk ${m.from_chunk + 1}`); break;
    case "finalizing":
      $("st-decoder").textContent = m.done < m.total ? `mp4: full VAE ${m.done}/${m.total}` : "tiny (preview); mp4 by the full VAE";
      if (m.done === 0) log(`decoding the mp4 with the full VAE (${m.total} chunk(s))`);
      break;
    case "end":
      S.done = true;
      status(m);
      controls(false);
      log(`${m.state}${m.error ? ": " + m.error : ""}`);
      if (m.video) { $("download").href = m.video; $("download").classList.remove("hidden"); }
      if (m.state === "failed") showError(m.error);
      break;
    case "error": showError(m.error); log(`error: ${m.error}`); break;
  }
}

function status(m) {
  setState(m.state);
  $("st-queue").textContent = m.state === "queued" ? `${m.queue_position} ahead` : m.queue_position === 0 ? "running" : "–";
  $("st-chunks").textContent = `${m.chunks_done}/${m.chunks_total}`;
  $("st-fps").textContent = m.fps ? `${m.fps.toFixed(2)} frames/s` : "–";
  $("pause").textContent = m.state === "paused" ? "Resume" : "Pause";
}

function setState(state) {
  S.state = state;
  $("st-state").textContent = state;
  $("st-state").className = `state-${state}`;
}

function controls(on) {
  for (const id of ["pause", "stop", "steer", "steer-send"]) $(id).disabled = !on;
  $("start").disabled = on;
}

function send(message) {
  if (S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(JSON.stringify(message));
}

// ---- the player: frames are queued as they arrive and shown at the video's frame rate ---------
function onFrame(buffer) {
  const view = new DataView(buffer);
  if (buffer.byteLength < HEADER_BYTES || view.getUint32(0, true) !== FRAME_MAGIC) return;
  S.queue.push({
    chunk: view.getUint32(4, true), index: view.getUint32(8, true), bitmap: null, decoding: false,
    jpeg: new Blob([new Uint8Array(buffer, HEADER_BYTES)], { type: "image/jpeg" }),
  });
  S.received++;
}

// Decode only the next few frames: when generation runs ahead of playback, the backlog stays JPEG.
function decodeAhead() {
  for (const entry of S.queue.slice(0, DECODE_AHEAD)) {
    if (entry.decoding) continue;
    entry.decoding = true;
    createImageBitmap(entry.jpeg)
      .then((b) => { entry.bitmap = b; })
      .catch(() => { entry.bitmap = "bad"; })
      .finally(() => { entry.jpeg = null; });
  }
}

function resetPlayer() {
  for (const e of S.queue) if (e.bitmap && e.bitmap.close) e.bitmap.close();
  Object.assign(S, { job: null, queue: [], received: 0, shown: 0, chunkPrompts: {}, nextDue: 0, playingChunk: null });
  $("download").classList.add("hidden");
  $("now-prompt").textContent = "";
  $("overlay").textContent = "waiting for the first chunk…";
  $("overlay").classList.remove("hidden");
}

function tick(now) {
  decodeAhead();
  const head = S.queue[0];
  if (head && head.bitmap && now >= S.nextDue) {
    S.queue.shift();
    if (head.bitmap !== "bad") {
      $("player").getContext("2d").drawImage(head.bitmap, 0, 0, $("player").width, $("player").height);
      head.bitmap.close();
    }
    S.shown++;
    // Keep the cadence, but never try to catch up on frames that arrived late.
    S.nextDue = Math.max(S.nextDue + 1000 / S.fps, now);
    if (S.playingChunk !== head.chunk) {
      S.playingChunk = head.chunk;
      const p = S.chunkPrompts[head.chunk];
      $("now-prompt").textContent = p ? `chunk ${head.chunk + 1}: ${p}` : "";
    }
    $("overlay").classList.add("hidden");
  } else if (!head && S.shown > 0 && !S.done) {
    $("overlay").textContent = "generating the next chunk…";
    $("overlay").classList.remove("hidden");
  }
  $("st-play").textContent = S.shown ? `frame ${S.shown} · ${S.queue.length} buffered` : "–";
  requestAnimationFrame(tick);
}

// ---- wiring ----------------------------------------------------------------------------------
$("start-form").addEventListener("submit", start);
$("upload").addEventListener("change", modeHint);
$("frames").addEventListener("input", lengthHint);
$("pause").addEventListener("click", () => send({ type: S.state === "paused" ? "resume" : "pause" }));
$("stop").addEventListener("click", () => send({ type: "stop" }));
$("steer-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const prompt = $("steer").value.trim();
  if (!prompt) return;
  send({ type: "steer", prompt });
  $("steer").value = "";
});
requestAnimationFrame(tick);
loadConfig().catch((e) => showError(`could not reach the server: ${e}`));
