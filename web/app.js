// The try-it page: sends an image to POST /infer?format=json&model=NAME and shows what comes back, then asks the same
// model for the cutout (?format=cutout). The picker and the model's card are models.js's; the mask PNG's decoding
// png.js's. No framework and no build step; everything the page shows is built with textContent, never innerHTML.
import { apiFetch, errorText, inferUrl, useKeyForm } from "./api.js";
import { ModelChooser, swatch } from "./models.js";
import { base64Bytes, decodePalettePng, paintIndices } from "./png.js";

const $ = (id) => document.getElementById(id);
const view = {
  model: $("model"), trained: $("trained"), drop: $("drop"), file: $("file"), camera: $("camera"),
  picker: $("picker"), choice: $("model-choice"), card: $("card"), inferred: $("inferred"),
  classes: $("card-classes"), facts: $("card-facts"),
  status: $("status"), error: $("error"), result: $("result"), summary: $("summary"), answeredBy: $("answered-by"),
  xModel: $("x-model"), input: $("input"), overlay: $("overlay"), mask: $("mask"), opacity: $("opacity"),
  opacityValue: $("opacity-value"), legend: document.querySelector("#legend tbody"),
  timings: document.querySelector("#timings tbody"), download: $("download"),
  cutoutFigure: $("cutout-figure"), cutout: $("cutout"), cutoutNote: $("cutout-note"), cutoutDownload: $("cutout-download"),
};

// Before the first request: a server with API keys answers 401, and the form asks for one (api.js).
useKeyForm({ form: $("key-form"), input: $("api-key"), message: $("key-message") });

const ACCEPT = { json: "application/json", cutout: "image/png" };
let sent = 0;          // the number of the latest image sent: an older answer arriving late is dropped
let shown = null;      // {inputUrl, maskUrl, cutoutUrl, inputShown} of the result on screen, for the overlay and clean-up
let last = null;       // {blob, name} of the latest image sent: sent again to a model picked after it

// Another model picked: its card is shown (models.js), and the image on screen is sent to it.
const chooser = new ModelChooser(view, () => {
  if (last) accept(last.blob, last.name);
});

// ---- sending an image ----

async function send(blob, name) {
  const number = ++sent;
  last = { blob, name };
  const model = chooser.name;
  clearError();
  view.status.textContent = `Sending ${name} (${formatBytes(blob.size)})${model ? ` to ${model}` : ""}…`;
  const started = performance.now();
  const response = await post(blob, name, "json", model);
  if (number !== sent) return;
  if (typeof response === "string") {
    fail(response);
    return;
  }
  const answer = await response.json();
  const elapsed = performance.now() - started;
  if (number !== sent) return;
  if (!chooser.card || JSON.stringify(chooser.card.classes) !== JSON.stringify(answer.classes)) {
    await chooser.load(); // the model was swapped since the page read its card
  }
  await show(blob, name, answer, response.headers, elapsed);
  if (chooser.cutouts) await showCutout(number, blob, name, model);
}

// The answer, or a sentence that says why there is none.
async function post(blob, name, format, model) {
  let response;
  try {
    response = await apiFetch(inferUrl(format, model), {
      method: "POST",
      body: blob,
      headers: { "Content-Type": blob.type || "application/octet-stream", Accept: ACCEPT[format] },
    });
  } catch (error) {
    return `The server could not be reached (${error.message}).`;
  }
  return response.ok ? response : `The server refused ${name}: ${await errorText(response)}`;
}

function fail(message) {
  view.status.textContent = "";
  view.error.textContent = message;
  view.error.hidden = false;
  view.result.hidden = true;
}

function clearError() {
  view.error.hidden = true;
  view.error.textContent = "";
}

// ---- showing the answer ----

async function show(blob, name, answer, headers, elapsed) {
  if (shown) {
    for (const url of [shown.inputUrl, shown.maskUrl, shown.cutoutUrl]) if (url) URL.revokeObjectURL(url);
  }
  const png = base64Bytes(answer.mask);
  const maskBlob = new Blob([png], { type: "image/png" });
  shown = { inputUrl: URL.createObjectURL(blob), maskUrl: URL.createObjectURL(maskBlob), cutoutUrl: null,
    inputShown: false };
  clearCutout();

  const decoded = await decodePalettePng(png);
  const card = chooser.card;
  const colours = card && card.palette && card.palette.length >= answer.classes.length
    ? card.palette : (decoded ? decoded.palette : []);
  view.mask.width = view.overlay.width = answer.width;
  view.mask.height = view.overlay.height = answer.height;
  if (decoded) {
    paintIndices(view.mask, decoded.indices, colours);
  } else {
    // No DecompressionStream in this browser: the PNG's own palette colours, as an image viewer shows them.
    view.mask.getContext("2d").drawImage(await loadImage(shown.maskUrl), 0, 0);
  }

  try {
    view.input.src = shown.inputUrl;
    await view.input.decode();
    shown.inputShown = true;
  } catch (_) {
    view.input.removeAttribute("src");
    view.input.alt = `This browser cannot show ${name}; the server could read it.`;
  }
  drawOverlay();

  const model = answer.model || {};
  const size = `${answer.width} × ${answer.height} pixels`;
  const id = headers.get("X-Request-ID");
  view.summary.textContent = `${name}: ${size}, segmented by ${model.name || "the model"} ` +
    `${model.version || ""}${id ? ` (request ID ${id})` : ""}.`;
  const answeredBy = headers.get("X-Model"); // NAME/VERSION: which model answered, whichever was asked for
  view.xModel.textContent = answeredBy || "";
  view.answeredBy.hidden = !answeredBy;
  showLegend(answer, colours);
  showTimings(headers.get("Server-Timing"), elapsed);
  view.download.href = shown.maskUrl;
  view.download.download = `${stem(name)}-mask.png`;
  view.status.textContent = `${name} segmented.`;
  view.result.hidden = false;
}

// The same image from the same model as ?format=cutout: an RGBA PNG, transparent outside the foreground classes.
async function showCutout(number, blob, name, model) {
  view.cutoutFigure.hidden = false;
  view.cutoutNote.textContent = "Making the cutout…";
  const response = await post(blob, name, "cutout", model);
  if (number !== sent) return;
  if (typeof response === "string") {
    view.cutoutNote.textContent = `No cutout: ${response}`;
    return;
  }
  const png = await response.blob();
  if (number !== sent) return;
  shown.cutoutUrl = URL.createObjectURL(png);
  view.cutout.src = shown.cutoutUrl;
  try {
    await view.cutout.decode();
  } catch (_) {
    view.cutoutNote.textContent = "This browser cannot show the cutout; the download has it.";
  }
  if (number !== sent) return;
  const kept = (chooser.card && chooser.card.foreground) || [];
  if (view.cutout.complete && view.cutout.naturalWidth) {
    view.cutoutNote.textContent = kept.length
      ? `Only ${kept.join(", ")} kept; transparent (the checkerboard) elsewhere.`
      : "Transparent (the checkerboard) outside the foreground classes.";
  }
  view.cutoutDownload.href = shown.cutoutUrl;
  view.cutoutDownload.download = `${stem(name)}-cutout.png`;
  view.cutoutDownload.hidden = false;
}

function clearCutout() {
  view.cutoutFigure.hidden = !chooser.cutouts;
  view.cutout.removeAttribute("src");
  view.cutoutNote.textContent = "";
  view.cutoutDownload.hidden = true;
  view.cutoutDownload.removeAttribute("href");
}

function stem(name) {
  return name.replace(/\.[^.]*$/, "") || "image";
}

function drawOverlay() {
  const opacity = Number(view.opacity.value) / 100;
  view.opacityValue.textContent = `${view.opacity.value} %`;
  if (!shown) return;
  const context = view.overlay.getContext("2d");
  const { width, height } = view.overlay;
  context.globalAlpha = 1;
  context.clearRect(0, 0, width, height);
  if (shown.inputShown) context.drawImage(view.input, 0, 0, width, height);
  // The same blend as the API's ?format=overlay: image × (1 − opacity) + class colour × opacity.
  context.globalAlpha = shown.inputShown ? opacity : 1;
  context.drawImage(view.mask, 0, 0);
  context.globalAlpha = 1;
}

function showLegend(answer, colours) {
  const classes = chooser.card ? chooser.card.classes : answer.classes;
  view.legend.replaceChildren(...classes.map((name, index) => {
    const row = document.createElement("tr");
    const fraction = answer.fractions[name] ?? 0;
    const share = cell(`${(fraction * 100).toFixed(2)} %`);
    share.dataset.fraction = String(fraction);
    row.append(cell(swatch(colours[index] || [0, 0, 0])), cell(name), share);
    row.className = "class";
    return row;
  }));
}

function showTimings(header, elapsed) {
  const rows = parseServerTiming(header);
  rows.push(["round trip, seen by this browser", elapsed]);
  view.timings.replaceChildren(...rows.map(([stage, ms]) => {
    const row = document.createElement("tr");
    row.append(cell(stage), cell(ms.toFixed(1)));
    return row;
  }));
}

// "decode;dur=13.1, infer;dur=7.2" -> [["decode", 13.1], ["infer", 7.2]]
function parseServerTiming(header) {
  if (!header) return [];
  return header.split(",").map((entry) => {
    const [name, ...params] = entry.trim().split(";");
    const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    return [name.trim(), dur ? Number(dur.slice(4)) : NaN];
  }).filter(([name, ms]) => name && Number.isFinite(ms));
}

function cell(content) {
  const td = document.createElement("td");
  if (typeof content === "string") td.textContent = content;
  else td.append(content);
  return td;
}

function loadImage(url) {
  const image = new Image();
  image.src = url;
  return image.decode().then(() => image);
}

function formatBytes(size) {
  return size < 1024 * 1024 ? `${Math.max(1, Math.round(size / 1024))} KB` : `${(size / 1048576).toFixed(1)} MB`;
}

// ---- the ways in: choose, camera, drop, paste, samples ----

// Every way in ends here, so an unexpected failure is shown on the page instead of thrown to the console.
function accept(blob, name) {
  send(blob, name).catch((error) => fail(`Something went wrong on this page: ${error.message}`));
}

function firstImage(files) {
  return Array.from(files || []).find((file) => file.type.startsWith("image/")) || (files && files[0]);
}

for (const input of [view.file, view.camera]) {
  input.addEventListener("change", () => {
    const file = input.files[0];
    if (file) accept(file, file.name || "photo");
    input.value = ""; // choosing the same file again sends it again
  });
}

// Anywhere on the page: a file dropped outside the zone must not make the browser navigate away to it.
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  view.drop.classList.add("dragging");
});
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) view.drop.classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  view.drop.classList.remove("dragging");
  const file = firstImage(event.dataTransfer && event.dataTransfer.files);
  if (file) accept(file, file.name || "dropped image");
  else fail("What was dropped is not a file: drop an image file.");
});

document.addEventListener("paste", (event) => {
  const file = firstImage(event.clipboardData && event.clipboardData.files);
  if (!file) return;
  event.preventDefault();
  accept(file, file.name && file.name !== "image.png" ? file.name : "pasted image");
});

for (const button of document.querySelectorAll("[data-sample]")) {
  button.addEventListener("click", () => {
    const url = button.dataset.sample;
    const name = url.split("/").pop();
    apiFetch(url)
      .then((response) => {
        if (!response.ok) throw new Error(`${url} answered ${response.status}`);
        return response.blob();
      })
      .then((blob) => accept(blob, name))
      .catch((error) => fail(`The sample could not be loaded: ${error.message}`));
  });
}

view.opacity.addEventListener("input", drawOverlay);

chooser.load().catch((error) => {
  view.model.textContent = `The model card could not be read: ${error.message}`;
});
