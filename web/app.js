// The try-it page: sends an image to POST /infer?format=json and shows what comes back.
// No framework and no build step; everything the page shows is built with textContent, never innerHTML.
"use strict";

(() => {
  const INFER_URL = "/infer?format=json";
  const MODEL_URL = "/v1/model";

  const $ = (id) => document.getElementById(id);
  const view = {
    model: $("model"), trained: $("trained"), drop: $("drop"), file: $("file"), camera: $("camera"),
    status: $("status"), error: $("error"), result: $("result"), summary: $("summary"),
    input: $("input"), overlay: $("overlay"), mask: $("mask"), opacity: $("opacity"),
    opacityValue: $("opacity-value"), legend: document.querySelector("#legend tbody"),
    timings: document.querySelector("#timings tbody"), download: $("download"),
  };

  let card = null;       // the model card from /v1/model, once read
  let sent = 0;          // the number of the latest image sent: an older answer arriving late is dropped
  let shown = null;      // {inputUrl, maskUrl, inputShown} of the result on screen, for the overlay and clean-up

  // ---- the model card ----

  async function loadCard() {
    let response;
    try {
      response = await fetch(MODEL_URL, { headers: { Accept: "application/json" } });
    } catch (error) {
      view.model.textContent = `The server could not be reached (${error.message}).`;
      return null;
    }
    if (!response.ok) {
      view.model.textContent = `The model card could not be read: ${await errorText(response)}`;
      return null;
    }
    card = await response.json();
    showCard(card);
    return card;
  }

  function showCard(model) {
    const parts = [`Model ${model.name} ${model.version}`];
    if (model.engine) parts[0] += ` (engine: ${model.engine})`;
    if (model.description) parts.push(model.description);
    const quality = model.quality;
    if (quality && typeof quality.miou === "number") {
      const perClass = Object.entries(quality.per_class_iou || {})
        .map(([name, iou]) => `${name} ${iou.toFixed(3)}`).join(", ");
      const measured = quality.images ? ` on ${quality.images} held-out images (${quality.data || "test split"})` : "";
      let line = `Measured${measured}: mIoU ${quality.miou.toFixed(3)}`;
      if (typeof quality.pixel_accuracy === "number") line += `, pixel accuracy ${quality.pixel_accuracy.toFixed(3)}`;
      if (perClass) line += `; IoU per class: ${perClass}`;
      parts.push(line);
    }
    view.model.textContent = parts.join(". ") + ".";
    const data = model.training && model.training.data;
    if (data === "synthetic") {
      view.trained.textContent = "This is a demonstration model trained on synthetic scenes (generated textured " +
        "shapes among distractors on cluttered backgrounds), not on photographs: it does well on scenes like the " +
        "samples below and will not segment your cat.";
    } else if (data) {
      view.trained.textContent = `This model was trained on ${data}.`;
    }
  }

  // ---- sending an image ----

  async function send(blob, name) {
    const number = ++sent;
    clearError();
    view.status.textContent = `Sending ${name} (${formatBytes(blob.size)})…`;
    const started = performance.now();
    let response;
    try {
      response = await fetch(INFER_URL, {
        method: "POST",
        body: blob,
        headers: { "Content-Type": blob.type || "application/octet-stream", Accept: "application/json" },
      });
    } catch (error) {
      if (number === sent) fail(`The server could not be reached (${error.message}).`);
      return;
    }
    if (!response.ok) {
      const message = await errorText(response);
      if (number === sent) fail(`The server refused ${name}: ${message}`);
      return;
    }
    const answer = await response.json();
    const elapsed = performance.now() - started;
    if (number !== sent) return;
    if (!card || JSON.stringify(card.classes) !== JSON.stringify(answer.classes)) {
      await loadCard(); // the model was swapped since the page read its card
    }
    await show(blob, name, answer, response.headers, elapsed);
  }

  // The JSON error's message (and its code and request ID), or what the status says when the body is not one.
  async function errorText(response) {
    const text = await response.text();
    let error = null;
    try {
      error = JSON.parse(text).error;
    } catch (_) {
      error = null;
    }
    const retry = response.headers.get("Retry-After");
    const after = retry ? ` Retry after ${retry} s.` : "";
    if (error && error.message) {
      const id = error.request_id ? ` (request ID ${error.request_id})` : "";
      return `${response.status} ${error.code || ""}: ${error.message}${id}.${after}`;
    }
    return `${response.status} ${response.statusText || "error"}, with no error message.${after}`;
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
      URL.revokeObjectURL(shown.inputUrl);
      URL.revokeObjectURL(shown.maskUrl);
    }
    const png = base64Bytes(answer.mask);
    const maskBlob = new Blob([png], { type: "image/png" });
    shown = { inputUrl: URL.createObjectURL(blob), maskUrl: URL.createObjectURL(maskBlob), inputShown: false };

    const decoded = await decodePalettePng(png);
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
    showLegend(answer, colours);
    showTimings(headers.get("Server-Timing"), elapsed);
    view.download.href = shown.maskUrl;
    view.download.download = `${name.replace(/\.[^.]*$/, "") || "image"}-mask.png`;
    view.status.textContent = `${name} segmented.`;
    view.result.hidden = false;
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
    const classes = card ? card.classes : answer.classes;
    view.legend.replaceChildren(...classes.map((name, index) => {
      const row = document.createElement("tr");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      const colour = colours[index] || [0, 0, 0];
      swatch.style.backgroundColor = `rgb(${colour[0]}, ${colour[1]}, ${colour[2]})`;
      const fraction = answer.fractions[name] ?? 0;
      const share = cell(`${(fraction * 100).toFixed(2)} %`);
      share.dataset.fraction = String(fraction);
      row.append(cell(swatch), cell(name), share);
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

  // ---- the mask PNG: class indices, not colours ----

  // Paint class indices with the class colours, opaque.
  function paintIndices(canvas, indices, colours) {
    const context = canvas.getContext("2d");
    const image = context.createImageData(canvas.width, canvas.height);
    const pixels = new Uint32Array(image.data.buffer);
    const lookup = new Uint32Array(256);
    const rgba = new Uint8Array(lookup.buffer);
    for (let index = 0; index < 256; index++) {
      const colour = colours[index] || [0, 0, 0];
      rgba.set([colour[0], colour[1], colour[2], 255], index * 4); // byte order as in ImageData, any endianness
    }
    for (let i = 0; i < indices.length; i++) pixels[i] = lookup[indices[i]];
    context.putImageData(image, 0, 0);
  }

  // A palette PNG's class indices and palette, or null when this browser cannot inflate it or it is not one.
  async function decodePalettePng(bytes) {
    if (typeof DecompressionStream !== "function") return null;
    const data = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    let width = 0, height = 0, depth = 0, colourType = -1, interlace = 1;
    const palette = [], compressed = [];
    for (let at = 8; at + 12 <= bytes.length;) {
      const length = data.getUint32(at);
      const type = String.fromCharCode(...bytes.subarray(at + 4, at + 8));
      const body = bytes.subarray(at + 8, at + 8 + length);
      if (type === "IHDR") {
        width = data.getUint32(at + 8);
        height = data.getUint32(at + 12);
        [depth, colourType] = [body[8], body[9]];
        interlace = body[12];
      } else if (type === "PLTE") {
        for (let i = 0; i + 2 < body.length; i += 3) palette.push([body[i], body[i + 1], body[i + 2]]);
      } else if (type === "IDAT") {
        compressed.push(body);
      } else if (type === "IEND") {
        break;
      }
      at += 12 + length;
    }
    if (colourType !== 3 || interlace !== 0 || ![1, 2, 4, 8].includes(depth)) return null;
    const stream = new Blob(compressed).stream().pipeThrough(new DecompressionStream("deflate"));
    const raw = new Uint8Array(await new Response(stream).arrayBuffer());
    const stride = Math.ceil((width * depth) / 8);
    if (raw.length < (stride + 1) * height) return null;
    const indices = new Uint8Array(width * height);
    let previous = new Uint8Array(stride), line = new Uint8Array(stride);
    const perByte = 8 / depth, bits = (1 << depth) - 1;
    for (let y = 0; y < height; y++) {
      const start = y * (stride + 1);
      unfilter(raw[start], raw.subarray(start + 1, start + 1 + stride), previous, line);
      const row = indices.subarray(y * width, (y + 1) * width);
      if (depth === 8) {
        row.set(line.subarray(0, width));
      } else {
        for (let x = 0; x < width; x++) {
          const shift = 8 - depth * (1 + (x % perByte));
          row[x] = (line[Math.floor(x / perByte)] >> shift) & bits;
        }
      }
      [previous, line] = [line, previous];
    }
    return { width, height, indices, palette };
  }

  // PNG's five scanline filters, one byte per pixel (palette images).
  function unfilter(filter, source, previous, line) {
    for (let i = 0; i < source.length; i++) {
      const left = i > 0 ? line[i - 1] : 0, up = previous[i], upLeft = i > 0 ? previous[i - 1] : 0;
      let predicted = 0;
      if (filter === 1) predicted = left;
      else if (filter === 2) predicted = up;
      else if (filter === 3) predicted = (left + up) >> 1;
      else if (filter === 4) {
        const p = left + up - upLeft, pa = Math.abs(p - left), pb = Math.abs(p - up), pc = Math.abs(p - upLeft);
        predicted = pa <= pb && pa <= pc ? left : pb <= pc ? up : upLeft;
      }
      line[i] = source[i] + predicted;
    }
  }

  function base64Bytes(text) {
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
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
      fetch(url)
        .then((response) => {
          if (!response.ok) throw new Error(`${url} answered ${response.status}`);
          return response.blob();
        })
        .then((blob) => accept(blob, name))
        .catch((error) => fail(`The sample could not be loaded: ${error.message}`));
    });
  }

  view.opacity.addEventListener("input", drawOverlay);

  loadCard().catch((error) => {
    view.model.textContent = `The model card could not be read: ${error.message}`;
  });
})();
