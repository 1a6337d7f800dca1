// RetinalGPT console: one photograph through POST /v1/analyses, its overlays, measurements,
// lesions and assessment, and a conversation about it (POST /v1/chat, streamed); a batch through
// POST /v1/batches and its progress. Plain browser JavaScript, no framework, no network beyond
// the gateway.
"use strict";

const LAYERS = ["combined", "vessels", "disc", "zones", "fovea", "lesions", "ma", "he", "ex", "se"];
const $ = (selector) => document.querySelector(selector);

function authHeaders() {
  const key = $("#api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text) {
  $("#status").textContent = text;
}

async function problemText(response) {
  try {
    const body = await response.json();
    return `${body.title || response.statusText}: ${body.detail || ""}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
}

function fillTable(selector, rows) {
  const body = $(`${selector} tbody`);
  body.replaceChildren();
  for (const values of rows) {
    const row = document.createElement("tr");
    values.forEach((value) => cell(row, value));
    body.appendChild(row);
  }
}

function number(value, digits = 3) {
  return value === undefined || value === null ? "not measured" : Number(value).toFixed(digits);
}

function measurementRows(findings) {
  const rows = [["Image quality", findings.quality ? findings.quality.grade : "not assessed"]];
  const unit = findings.vessels ? findings.vessels.length_unit : "";
  const disc = findings.disc || {};
  rows.push(["Vertical cup-to-disc ratio", number(disc.cdr_vertical, 2)]);
  rows.push(["Horizontal cup-to-disc ratio", number(disc.cdr_horizontal, 2)]);
  const whole = (findings.vessels ? findings.vessels.features : []).find(
    (f) => f.vessel_type === "all" && f.region === "whole",
  );
  if (whole) {
    rows.push(["Fractal dimension", number(whole.fractal_dimension)]);
    rows.push(["Vessel density", number(whole.vessel_density)]);
    rows.push([`Average vessel width (${unit})`, number(whole.average_width, 2)]);
    rows.push(["Distance tortuosity", number(whole.distance_tortuosity)]);
  }
  const zoneB = (findings.vessels ? findings.vessels.calibers : []).find((c) => c.region === "zone_b");
  if (zoneB) {
    rows.push([`CRAE, Knudtson (${unit})`, number(zoneB.crae_knudtson, 1)]);
    rows.push([`CRVE, Knudtson (${unit})`, number(zoneB.crve_knudtson, 1)]);
    rows.push(["AVR, Knudtson", number(zoneB.avr_knudtson, 2)]);
  }
  for (const count of findings.lesion_counts || []) {
    rows.push([`${count.type.replace("_", " ")} count`, String(count.count)]);
  }
  return rows;
}

function lesionRows(findings) {
  return (findings.lesions || []).map((lesion) => {
    const position = lesion.position || {};
    const box = lesion.box || {};
    return [
      lesion.type.replace("_", " "),
      number(lesion.confidence, 2),
      position.quadrant ? position.quadrant.replace("_", "-") : "unknown",
      number(position.distance_to_fovea_dd, 2),
      [box.x_min, box.y_min, box.x_max, box.y_max].map((v) => number(v, 4)).join(", "),
    ];
  });
}

function showAssessment(assessment) {
  const target = $("#assessment");
  target.replaceChildren();
  if (!assessment) {
    target.textContent = "No assessment.";
    return;
  }
  const headline = document.createElement("p");
  const grade = assessment.dr_grade === undefined ? "not estimated" : `ICDR ${assessment.dr_grade}`;
  headline.textContent = `DR grade: ${grade}; ${assessment.referral || "referral not assessed"}`;
  if (assessment.referral === "referable") headline.className = "referable";
  target.appendChild(headline);
  for (const [title, items] of [["Reasons", assessment.reasons], ["Caveats", assessment.caveats]]) {
    const heading = document.createElement("h4");
    heading.textContent = title;
    const list = document.createElement("ul");
    for (const item of items || []) {
      const li = document.createElement("li");
      li.textContent = item;
      list.appendChild(li);
    }
    target.append(heading, list);
  }
}

async function blobUrl(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw new Error(await problemText(response));
  return URL.createObjectURL(await response.blob());
}

// Links to API files (FHIR bundle, batch results) need the key: fetched, then saved.
async function download(event) {
  event.preventDefault();
  const link = event.currentTarget;
  const saver = document.createElement("a");
  saver.href = await blobUrl(link.getAttribute("href"));
  saver.download = link.getAttribute("download") || "";
  saver.click();
  setTimeout(() => URL.revokeObjectURL(saver.href), 10000);
}

async function showOverlays(overlays) {
  const stack = $("#overlay-stack");
  const choices = $("#layers");
  stack.replaceChildren();
  choices.querySelectorAll("label").forEach((label) => label.remove());
  const image = document.createElement("img");
  image.alt = "Overlay of the analysed photograph";
  stack.appendChild(image);
  const layers = LAYERS.filter((layer) => layer in overlays);
  for (const layer of layers) {
    const label = document.createElement("label");
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = "layer";
    radio.value = layer;
    radio.addEventListener("change", async () => {
      image.src = await blobUrl(overlays[layer]);
      image.alt = `Overlay: ${layer}`;
    });
    label.append(radio, ` ${layer} `);
    choices.appendChild(label);
  }
  if (layers.length) {
    choices.querySelector("input").checked = true;
    image.src = await blobUrl(overlays[layers[0]]);
    image.alt = `Overlay: ${layers[0]}`;
  }
}

// The conversation about the analysis shown: [{role, content}], sent whole with each question.
let chat = { analysisId: null, messages: [] };

function say(role, text) {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = text;
  $("#conversation").appendChild(item);
  return item;
}

// The final answer, its grounded values marked: measured ones (with their findings key) and
// the "not measured" the grounding check put where the model stated an unmeasured number.
function markGrounded(item, answer, grounding) {
  const measured = grounding.values.filter((v) => v.measured);
  const marks = [
    ...measured.map((v) => ({ text: v.text, className: "measured", title: v.findings_key })),
    { text: "not measured", className: "unmeasured", title: "no measurement supports it" },
  ];
  item.replaceChildren();
  let rest = answer;
  while (rest) {
    let next = null;
    for (const mark of marks) {
      const at = rest.indexOf(mark.text);
      if (mark.text && at >= 0 && (!next || at < next.at)) next = { ...mark, at };
    }
    if (!next) break;
    item.append(rest.slice(0, next.at));
    const span = document.createElement("mark");
    span.className = next.className;
    span.title = next.title;
    span.textContent = next.text;
    item.appendChild(span);
    rest = rest.slice(next.at + next.text.length);
  }
  item.append(rest);
  if (grounding.repaired) {
    const note = document.createElement("small");
    note.textContent = ` (${grounding.unmatched} unmeasured value(s) repaired)`;
    item.appendChild(note);
  }
}

// The blank line that ends a server-sent event (any of the three line endings SSE allows).
const EVENT_END = /\r\n\r\n|\n\n|\r\r/;

// POST /v1/chat with stream=true; server-sent events: delta {text}, done {answer, grounding},
// error {problem details}.
async function ask(event) {
  event.preventDefault();
  const question = $("#question").value.trim();
  if (!question || !chat.analysisId) return;
  chat.messages.push({ role: "user", content: question });
  say("user", question);
  $("#question").value = "";
  const item = say("assistant", "…");
  // Screen readers announce the answer once, when it is complete (aria-busy while streaming).
  item.dataset.state = "streaming";
  $("#conversation").setAttribute("aria-busy", "true");
  try {
    await streamAnswer(item);
  } finally {
    $("#conversation").setAttribute("aria-busy", "false");
    if (item.dataset.state === "streaming") item.dataset.state = "error";
  }
}

async function streamAnswer(item) {
  const response = await fetch("/v1/chat", {
    method: "POST",
    headers: { ...authHeaders(), "Content-Type": "application/json" },
    body: JSON.stringify({ analysis_id: chat.analysisId, messages: chat.messages, stream: true }),
  });
  if (!response.ok) {
    chat.messages.pop();
    item.textContent = await problemText(response);
    item.dataset.state = "error";
    return;
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let streamed = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = EVENT_END.exec(buffer))) {
      const lines = buffer.slice(0, end.index).split(/\r\n|\r|\n/);
      buffer = buffer.slice(end.index + end[0].length);
      const named = lines.find((line) => line.startsWith("event:"));
      const kind = named ? named.slice(6).trim() : "message";
      const data = lines
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("\n");
      if (!data) continue;
      const payload = JSON.parse(data);
      if (kind === "delta") {
        streamed += payload.text;
        item.textContent = streamed;
      } else if (kind === "done") {
        chat.messages.push({ role: "assistant", content: payload.answer });
        markGrounded(item, payload.answer, payload.grounding);
        item.dataset.state = "done";
      } else if (kind === "error") {
        chat.messages.pop();
        item.textContent = `${payload.title}: ${payload.detail || ""}`;
        item.dataset.state = "error";
      }
    }
  }
}

async function analyse(event) {
  event.preventDefault();
  const file = $("#image").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  form.append("overlays", LAYERS.join(","));
  const pixelSize = $("#pixel-size").value;
  if (pixelSize) form.append("pixel_size_um", pixelSize);
  setStatus("Analysing…");
  const response = await fetch("/v1/analyses", { method: "POST", body: form, headers: authHeaders() });
  if (!response.ok) {
    setStatus(await problemText(response));
    return;
  }
  const result = await response.json();
  fillTable("#measurements", measurementRows(result.findings));
  fillTable("#lesions", lesionRows(result.findings));
  showAssessment(result.findings.assessment);
  $("#fhir-link").href = `/v1/analyses/${result.id}/fhir`;
  $("#fhir-link").download = `analysis-${result.id}-fhir.json`;
  chat = { analysisId: result.id, messages: [] };
  $("#conversation").replaceChildren();
  $("#result").hidden = false;
  await showOverlays(result.overlays);
  setStatus(`Done (analysis ${result.id}${result.cached ? ", stored result" : ""}).`);
}

// The batch shown: its id, and the timer of its next GET /v1/batches/{id}.
const FINAL = ["completed", "completed_with_errors", "cancelled"];
let batch = { id: null, timer: null };

function setBatchStatus(text) {
  $("#batch-status").textContent = text;
}

function showBatch(status) {
  if (status.id !== batch.id) return; // an answer about a batch no longer shown
  const counts = status.counts;
  const finished = counts.total - counts.pending;
  $("#batch-bar").max = Math.max(counts.total, 1);
  $("#batch-bar").value = finished;
  const extra = ["skipped", "cancelled"].filter((s) => counts[s]).map((s) => `, ${counts[s]} ${s}`);
  setBatchStatus(
    `${status.state.replaceAll("_", " ")}: ${finished} of ${counts.total} finished; ` +
      `${counts.done} done, ${counts.failed} failed, ${counts.pending} pending${extra.join("")}`,
  );
  $("#batch-errors").replaceChildren(
    ...status.errors.map((error) => {
      const item = document.createElement("li");
      item.textContent = `${error.name}: ${error.code} (${error.detail})`;
      return item;
    }),
  );
  for (const format of ["jsonl", "csv"]) {
    $(`#batch-${format}`).href = status.results[format];
    $(`#batch-${format}`).download = `batch-${status.id}.${format}`;
  }
  const final = FINAL.includes(status.state);
  $("#batch-cancel").disabled = final;
  clearTimeout(batch.timer);
  if (!final) batch.timer = setTimeout(() => batchCall("GET").catch(batchError), 1000);
}

function batchError(error) {
  setBatchStatus(`Error: ${error.message}`);
}

// GET (poll) or DELETE (cancel) the batch shown; a busy or failing gateway is asked again.
async function batchCall(method) {
  const id = batch.id;
  const response = await fetch(`/v1/batches/${id}`, { method, headers: authHeaders() });
  if (response.ok) {
    showBatch(await response.json());
    return;
  }
  setBatchStatus(await problemText(response));
  if (method === "GET" && (response.status === 429 || response.status >= 500) && id === batch.id) {
    batch.timer = setTimeout(() => batchCall("GET").catch(batchError), 3000);
  }
}

async function submitBatch(event) {
  event.preventDefault();
  const files = $("#batch-files").files;
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file);
  clearTimeout(batch.timer);
  batch = { id: null, timer: null };
  $("#batch-cancel").disabled = true;
  setBatchStatus(`Uploading ${files.length} file(s)…`);
  const response = await fetch("/v1/batches", { method: "POST", body: form, headers: authHeaders() });
  if (!response.ok) {
    setBatchStatus(await problemText(response));
    return;
  }
  const status = await response.json();
  batch.id = status.id;
  $("#batch-id").textContent = status.id;
  $("#batch-progress").hidden = false;
  showBatch(status);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#api-key").value = sessionStorage.getItem("retinal-api-key") || "";
  $("#access").addEventListener("submit", (event) => event.preventDefault());
  $("#api-key").addEventListener("change", () => {
    sessionStorage.setItem("retinal-api-key", $("#api-key").value.trim());
  });
  $("#fhir-link").addEventListener("click", (event) => {
    download(event).catch((error) => setStatus(`Error: ${error.message}`));
  });
  for (const link of document.querySelectorAll("#batch-progress a")) {
    link.addEventListener("click", (event) => download(event).catch(batchError));
  }
  $("#batch-upload").addEventListener("submit", (event) => submitBatch(event).catch(batchError));
  $("#batch-cancel").addEventListener("click", () => batchCall("DELETE").catch(batchError));
  $("#upload").addEventListener("submit", (event) => {
    analyse(event).catch((error) => setStatus(`Error: ${error.message}`));
  });
  $("#ask").addEventListener("submit", (event) => {
    ask(event).catch((error) => setStatus(`Error: ${error.message}`));
  });
});
