// The review page: send DICOMs to /v1/predict, draw each image with its boxes, filter by a threshold.
//
// Each file is one request (?preview=1 for the picture, ?threshold=0 for every box the model keeps), so a
// bad file fails alone and concurrent files are batched by the service. Boxes are kept in original
// pixels; the slider only filters them here (no new request). Every drawn card exposes what it shows:
// article[data-state] (pending, done, error), canvas[data-boxes] (JSON [[x, y, w, h, score], ...] of the
// boxes drawn, original pixels) and article[data-box-count]. Text from the service goes in with
// textContent only (a PatientID is data, never markup).
"use strict";

const state = {
  card: null,          // GET /v1/model
  runThreshold: 0.5,   // the run's validation threshold
  token: sessionStorage.getItem("pneumodet-token") || "",
  results: [],         // {file, element, answer (one image of the response), model}
  inFlight: 0,
  queue: [],
};
const MAX_PARALLEL = 4;
const COLOURS = {box: "#ff3b30", label: "#ffd60a"};

const $ = (selector, root = document) => root.querySelector(selector);

function headers() {
  return state.token ? {Authorization: `Bearer ${state.token}`} : {};
}

function threshold() {
  return Number($("#threshold").value);
}

function setStatus(text) {
  $("#status").textContent = text;
}

// ------------------------------------------------------------------ model card
async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/model", {headers: headers()});
  } catch (err) {
    $("#model").textContent = `the service cannot be reached (${err})`;
    return;
  }
  if (response.status === 401) {
    $("#auth").hidden = false;
    $("#model").textContent = "enter the service's token to start";
    return;
  }
  if (!response.ok) {
    $("#model").textContent = `model card unavailable (HTTP ${response.status})`;
    return;
  }
  $("#auth").hidden = true;
  const card = await response.json();
  state.card = card;
  state.runThreshold = card.validation_threshold;
  const vmap = card.validation_map == null ? "n/a" : card.validation_map.toFixed(3);
  const data = card.training && card.training.data ? ` · trained on ${card.training.data}` : "";
  $("#model").textContent = `${card.encoder} · ${card.image_size} px · validation mAP ${vmap} · ` +
    `threshold ${state.runThreshold.toFixed(2)} · checkpoint ${card.checkpoint_sha256.slice(0, 12)}${data}`;
  $("#model").dataset.threshold = String(state.runThreshold);
  setThreshold(state.runThreshold);
}

// ------------------------------------------------------------------ sending files
function addFiles(files) {
  for (const file of files) {
    const element = $("#card").content.firstElementChild.cloneNode(true);
    element.dataset.file = file.name;
    $(".file", element).textContent = file.name;
    $(".message", element).textContent = "waiting for the service…";
    $("#results").append(element);
    const result = {file: file.name, element, answer: null, model: null};
    state.results.push(result);
    state.queue.push([file, result]);
  }
  $("#clear").disabled = state.results.length === 0;
  pump();
}

function pump() {
  while (state.inFlight < MAX_PARALLEL && state.queue.length) {
    const [file, result] = state.queue.shift();
    state.inFlight += 1;
    send(file, result).finally(() => {
      state.inFlight -= 1;
      updateStatus();
      pump();
    });
  }
  updateStatus();
}

function updateStatus() {
  const done = state.results.filter((r) => r.element.dataset.state !== "pending").length;
  setStatus(state.results.length ? `${done} of ${state.results.length} image(s) answered` : "");
}

async function send(file, result, attempt = 0) {
  const body = new FormData();
  body.append("file", file, file.name);
  let response;
  try {
    response = await fetch("/v1/predict?preview=1&threshold=0", {method: "POST", body, headers: headers()});
  } catch (err) {
    return showError(result, `the service cannot be reached (${err})`);
  }
  if (response.status === 503 && attempt < 5) {  // queue full: wait as told, then try again
    const wait = Math.min(30, Number(response.headers.get("Retry-After")) || 1);
    $(".message", result.element).textContent = `the service is busy; retrying in ${wait} s…`;
    await new Promise((resolve) => setTimeout(resolve, wait * 1000));
    return send(file, result, attempt + 1);
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch (err) {
    return showError(result, `HTTP ${response.status}: not a JSON answer`);
  }
  if (!response.ok) {
    if (response.status === 401) {
      $("#auth").hidden = false;
    }
    const causes = (payload.files || []).map((f) => `${f.file}: ${f.cause}`).join("; ");
    return showError(result, `HTTP ${response.status}: ${causes || payload.error}`);
  }
  result.answer = payload.images[0];
  result.model = payload.model;
  await showAnswer(result);
  $("#download").disabled = false;
}

function showError(result, text) {
  result.element.dataset.state = "error";
  $(".message", result.element).textContent = text;
  $(".boxes", result.element).hidden = true;
}

// ------------------------------------------------------------------ drawing
function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the preview did not load"));
    image.src = src;
  });
}

async function showAnswer(result) {
  const {answer, element} = result;
  const ids = [answer.patientId ? `patient ${answer.patientId}` : "no PatientID",
    `${answer.original_size[1]} × ${answer.original_size[0]} px`];
  $(".ids", element).textContent = ids.join(" · ");
  element.dataset.patientId = answer.patientId || "";
  element.dataset.sopInstanceUid = answer.sopInstanceUID || "";
  $(".message", element).textContent = "";
  result.picture = await loadImage(answer.preview.png);
  const probs = $(".probs", element);
  probs.replaceChildren();
  for (const [name, p] of Object.entries(answer.class_probs)) {
    const row = document.createElement("div");
    row.className = "prob";
    row.dataset.className = name;
    row.dataset.probability = String(p);
    const label = document.createElement("span");
    label.textContent = name;
    const bar = document.createElement("meter");
    bar.min = 0;
    bar.max = 1;
    bar.value = p;
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = p.toFixed(3);
    row.append(label, bar, value);
    probs.append(row);
  }
  const notes = $(".notes", element);
  notes.replaceChildren(...(answer.notes || []).map((text) => {
    const li = document.createElement("li");
    li.textContent = text;
    return li;
  }));
  draw(result);
  element.dataset.state = "done";
}

function visibleBoxes(answer, t) {
  const out = [];
  answer.boxes.forEach((box, i) => {
    if (answer.scores[i] >= t) out.push([...box, answer.scores[i]]);
  });
  return out;
}

function draw(result) {
  const {answer, element, picture} = result;
  if (!answer || !picture) return;
  const canvas = $("canvas", element);
  const t = threshold();
  const boxes = visibleBoxes(answer, t);
  canvas.width = answer.preview.width;
  canvas.height = answer.preview.height;
  const scale = answer.preview.width / answer.original_size[1];  // preview px per original px
  const ctx = canvas.getContext("2d");
  ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
  const line = Math.max(2, Math.round(canvas.width / 256));
  ctx.lineWidth = line;
  ctx.font = `${Math.max(12, Math.round(canvas.width / 40))}px sans-serif`;
  ctx.textBaseline = "bottom";
  for (const [x, y, w, h, score] of boxes) {
    ctx.strokeStyle = COLOURS.box;
    ctx.strokeRect(x * scale, y * scale, w * scale, h * scale);
    const text = score.toFixed(2);
    const tw = ctx.measureText(text).width;
    const ty = Math.max(parseInt(ctx.font, 10) + 2, y * scale);
    ctx.fillStyle = "rgba(0, 0, 0, 0.6)";
    ctx.fillRect(x * scale, ty - parseInt(ctx.font, 10) - 2, tw + 6, parseInt(ctx.font, 10) + 2);
    ctx.fillStyle = COLOURS.label;
    ctx.fillText(text, x * scale + 3, ty);
  }
  canvas.dataset.boxes = JSON.stringify(boxes);
  canvas.dataset.scale = String(scale);
  element.dataset.boxCount = String(boxes.length);
  const table = $(".boxes", element);
  table.hidden = false;
  $("caption", table).textContent = `${boxes.length} box(es) at threshold ${t.toFixed(2)} ` +
    `(${answer.boxes.length} above the model's floor)`;
  $("tbody", table).replaceChildren(...boxes.map(([x, y, w, h, score], i) => {
    const tr = document.createElement("tr");
    for (const v of [i + 1, score.toFixed(3), x.toFixed(0), y.toFixed(0), w.toFixed(0), h.toFixed(0)]) {
      const td = document.createElement("td");
      td.textContent = String(v);
      tr.append(td);
    }
    return tr;
  }));
}

function setThreshold(value) {
  $("#threshold").value = String(value);
  onThreshold();
}

function onThreshold() {
  const t = threshold();
  $("#threshold-value").textContent = t.toFixed(2);
  document.body.dataset.threshold = String(t);
  for (const result of state.results) draw(result);
}

// ------------------------------------------------------------------ download
function download() {
  const t = threshold();
  const done = state.results.filter((r) => r.answer);
  const images = done.map(({answer}) => {
    const kept = visibleBoxes(answer, t);
    const {preview, ...rest} = answer;
    return {...rest, boxes: kept.map((b) => b.slice(0, 4)), scores: kept.map((b) => b[4])};
  });
  const payload = {
    box_format: "x, y, width, height in original image pixels (top-left corner)",
    threshold: t,
    run_threshold: state.runThreshold,
    model: done.length ? done[0].model : state.card,
    images,
  };
  const blob = new Blob([JSON.stringify(payload, null, 1)], {type: "application/json"});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "pneumodet_predictions.json";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

// ------------------------------------------------------------------ wiring
function init() {
  const drop = $("#drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    addFiles([...event.dataTransfer.files]);
  });
  $("#files").addEventListener("change", (event) => {
    addFiles([...event.target.files]);
    event.target.value = "";
  });
  $("#threshold").addEventListener("input", onThreshold);
  $("#threshold-reset").addEventListener("click", () => setThreshold(state.runThreshold));
  $("#download").addEventListener("click", download);
  $("#clear").addEventListener("click", () => {
    state.results = state.results.filter((r) => r.element.dataset.state === "pending");
    for (const el of [...document.querySelectorAll("article.result")]) {
      if (el.dataset.state !== "pending") el.remove();
    }
    $("#download").disabled = !state.results.some((r) => r.answer);
    updateStatus();
  });
  $("#token-use").addEventListener("click", () => {
    state.token = $("#token").value.trim();
    sessionStorage.setItem("pneumodet-token", state.token);
    loadModel();
  });
  onThreshold();
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
