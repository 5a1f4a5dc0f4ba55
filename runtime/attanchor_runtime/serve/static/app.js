// The page: pick or drop an image, ask, watch the answer stream in, see where the anchors landed.
// No build step and no CDN: plain JavaScript against the server's own OpenAI-style API.
"use strict";

const $ = (id) => document.getElementById(id);
const SIDE = 512; // the canvas side, as --show-anchors draws it
const state = { model: null, info: null, image: null, dataUrl: null, anchors: [] };

function headers(extra) {
  const all = Object.assign({ "Content-Type": "application/json" }, extra || {});
  const key = $("key").value.trim();
  if (key) all.Authorization = "Bearer " + key;
  return all;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

async function loadModel() {
  const response = await fetch("v1/models", { headers: headers() });
  if (!response.ok) {
    $("model").textContent = "";
    setStatus(response.status === 401 ? "This server needs an API key: open 'API key' below."
                                      : "Cannot list the model: " + (await errorText(response)), true);
    return;
  }
  const card = (await response.json()).data[0];
  state.model = card.id;
  state.info = card.attanchor;
  $("model").textContent = card.id + " · threshold " + card.attanchor.threshold.toFixed(3) + " by default";
  $("threshold").value = card.attanchor.threshold;
  showThreshold();
  setStatus("");
  ready();
}

function showThreshold() {
  const value = Number($("threshold").value);
  $("threshold-value").textContent = value > 1 ? "off" : value.toFixed(3);
}

function ready() {
  $("send").disabled = !(state.model && state.image);
}

// -- the image: kept as a PNG or JPEG data URL (the API's image_url), drawn as the model sees it ----------
function useFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const image = new Image();
    image.onload = () => {
      let url = reader.result;
      if (!/^data:image\/(png|jpeg);/.test(url)) { // other formats: re-encoded as PNG in the browser
        const canvas = document.createElement("canvas");
        canvas.width = image.naturalWidth;
        canvas.height = image.naturalHeight;
        canvas.getContext("2d").drawImage(image, 0, 0);
        url = canvas.toDataURL("image/png");
      }
      state.image = image;
      state.dataUrl = url;
      state.anchors = [];
      $("hint").classList.add("hidden");
      draw();
      ready();
    };
    image.onerror = () => setStatus("Cannot read that file as an image.", true);
    image.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function draw() {
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, SIDE, SIDE);
  if (!state.image) return;
  const w = state.image.naturalWidth, h = state.image.naturalHeight;
  ctx.imageSmoothingEnabled = false;
  if (state.info && state.info.crop === "stretch") {
    ctx.drawImage(state.image, 0, 0, SIDE, SIDE);
  } else { // shortest edge to the side, centre crop: the CLIP/SigLIP processors' view
    const scale = SIDE / Math.min(w, h);
    ctx.drawImage(state.image, (SIDE - w * scale) / 2, (SIDE - h * scale) / 2, w * scale, h * scale);
  }
  const grid = state.info ? state.info.grid : 0;
  if (grid > 1) {
    const cell = SIDE / grid;
    ctx.strokeStyle = "rgba(255,255,255,0.6)";
    ctx.lineWidth = 1;
    for (let i = 1; i < grid; i++) {
      ctx.beginPath(); ctx.moveTo(i * cell, 0); ctx.lineTo(i * cell, SIDE); ctx.stroke();
      ctx.beginPath(); ctx.moveTo(0, i * cell); ctx.lineTo(SIDE, i * cell); ctx.stroke();
    }
    drawAnchors(ctx, cell);
  }
  canvas.dataset.anchors = String(state.anchors.length);
}

function drawAnchors(ctx, cell) {
  const patches = new Map(); // "row,col" -> words anchored there
  for (const a of state.anchors) {
    const key = a.row + "," + a.col;
    if (!patches.has(key)) patches.set(key, []);
    if (!patches.get(key).includes(a.token)) patches.get(key).push(a.token);
  }
  ctx.font = "16px sans-serif";
  ctx.textBaseline = "top";
  for (const [key, words] of patches) {
    const [row, col] = key.split(",").map(Number);
    const x = col * cell, y = row * cell;
    ctx.strokeStyle = "rgb(255,220,0)";
    ctx.lineWidth = 4;
    ctx.strokeRect(x + 2, y + 2, cell - 4, cell - 4);
    const label = words.join(",");
    const width = ctx.measureText(label).width;
    const lx = Math.min(x + 4, SIDE - width - 4), ly = y + 4;
    ctx.fillStyle = "rgb(0,0,0)";
    ctx.fillRect(lx - 2, ly - 2, width + 4, 20);
    ctx.fillStyle = "rgb(255,220,0)";
    ctx.fillText(label, lx, ly);
  }
  $("anchors").textContent = state.anchors.length
    ? state.anchors.length + " anchor(s): " + state.anchors.map((a) => `${a.token} → (${a.row}, ${a.col})`).join("; ")
    : "";
}

// -- asking: one streamed chat completion ------------------------------------------------------------------
async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || !state.image) return;
  const threshold = Number($("threshold").value);
  $("answer").textContent = "";
  state.anchors = [];
  draw();
  $("send").disabled = true;
  document.body.dataset.state = "asking";
  setStatus("asking…");
  const started = performance.now();
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model: state.model, stream: true, threshold,
        messages: [{ role: "user", content: [
          { type: "image_url", image_url: { url: state.dataUrl } },
          { type: "text", text: question },
        ] }],
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response);
    document.body.dataset.state = "done";
    setStatus(`answered in ${((performance.now() - started) / 1000).toFixed(2)} s`);
  } catch (error) {
    document.body.dataset.state = "error";
    setStatus(String(error.message || error), true);
  } finally {
    ready();
  }
}

async function readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const message = JSON.parse(data);
        if (message.error) throw new Error(message.error.message);
        const choice = message.choices && message.choices[0];
        if (!choice) continue;
        if (choice.delta.content) $("answer").textContent += choice.delta.content;
        if (choice.delta.anchors) {
          state.anchors = choice.delta.anchors;
          draw();
        }
      }
    }
  }
}

// -- wiring ------------------------------------------------------------------------------------------------
$("file").addEventListener("change", (e) => useFile(e.target.files[0]));
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  useFile(e.dataTransfer.files[0]);
});
$("threshold").addEventListener("input", showThreshold);
$("ask").addEventListener("submit", ask);
$("key").addEventListener("change", loadModel);
loadModel();
