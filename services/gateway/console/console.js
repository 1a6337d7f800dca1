// RetinalGPT console: one photograph through POST /v1/analyses, its overlays, measurements,
// lesions and assessment, and a conversation about it (POST /v1/chat, streamed). Plain browser JavaScript, no framework, no network beyond the gateway.
"use strict";

const LAYERS = ["combined", "vessels", "disc", "zones", "fovea", "lesions", "ma", "he", "ex", "se"];
const $ = (selector) => document.querySelector(selector);

function authHeaders() {
  const key = sessionStorage.getItem("retinal-api-key") || "";
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

async function overlayUrl(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw new Error(await problemText(response));
  return URL.createObjectURL(await response.blob());
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
      image.src = await overlayUrl(overlays[layer]);
      image.alt = `Overlay: ${layer}`;
    });
    label.append(radio, ` ${layer} `);
    choices.appendChild(label);
  }
  if (layers.length) {
    choices.querySelector("input").checked = true;
    image.src = await overlayUrl(overlays[layers[0]]);
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
  const response = await fetch("/v1/chat", {
    method: "POST",
    headers: { ...authHeaders(), "Content-Type": "application/json" },
    body: JSON.stringify({ analysis_id: chat.analysisId, messages: chat.messages, stream: true }),
  });
  if (!response.ok) {
    chat.messages.pop();
    item.textContent = await problemText(response);
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
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const kind = (block.match(/^event: *(.*)$/m) || [])[1] || "message";
      const data = block
        .split("\n")
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
      } else if (kind === "error") {
        chat.messages.pop();
        item.textContent = `${payload.title}: ${payload.detail || ""}`;
      }
    }
  }
}

async function analyse(event) {
  event.preventDefault();
  sessionStorage.setItem("retinal-api-key", $("#api-key").value.trim());
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
  chat = { analysisId: result.id, messages: [] };
  $("#conversation").replaceChildren();
  $("#result").hidden = false;
  await showOverlays(result.overlays);
  setStatus(`Done (analysis ${result.id}${result.cached ? ", stored result" : ""}).`);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#api-key").value = sessionStorage.getItem("retinal-api-key") || "";
  $("#upload").addEventListener("submit", (event) => {
    analyse(event).catch((error) => setStatus(`Error: ${error.message}`));
  });
  $("#ask").addEventListener("submit", (event) => {
    ask(event).catch((error) => setStatus(`Error: ${error.message}`));
  });
});
