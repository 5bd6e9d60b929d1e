// The models the server serves (GET /v1/models), the picker that chooses one, and the chosen model's card.
// An older server has no /v1/models: the page then reads its one model's card from GET /v1/model, with no picker,
// and sends images with no ?model= (the default model answers).
import { MODELS_URL, MODEL_URL, getJson } from "./api.js";

const ready = (model) => model.state === "ready";

export class ModelChooser {
  /** `view`: the page's elements; `onChoose(card)`: called when a person picks another model. */
  constructor(view, onChoose) {
    this.view = view;
    this.onChoose = onChoose;
    this.models = []; // /v1/models' objects; empty on an older server
    this.card = null; // the chosen model's card, with its name and served version
    view.choice.addEventListener("change", () => this.choose(view.choice.value, true));
  }

  /** The chosen model's name for ?model=, or null where the server lists no models (its default answers). */
  get name() {
    return this.models.length ? this.card && this.card.name : null;
  }

  /** Whether the server answers ?format=cutout: one that lists its models does. */
  get cutouts() {
    return this.models.length > 0;
  }

  /** Read the models (again: the chosen one stays chosen while it is ready), or the one model's card. */
  async load() {
    let listing = null;
    try {
      listing = await getJson(MODELS_URL);
    } catch (_) {
      listing = null; // an older server: its one model, below
    }
    if (listing && Array.isArray(listing.models) && listing.models.some(ready)) {
      this.list(listing);
      return;
    }
    this.models = [];
    this.view.picker.hidden = true;
    try {
      this.card = await getJson(MODEL_URL);
    } catch (error) {
      this.card = null;
      this.view.model.textContent = `The model card could not be read: ${error.message}`;
      return;
    }
    showCard(this.view, this.card);
  }

  list(listing) {
    const kept = this.card && this.card.name;
    this.models = listing.models;
    this.view.choice.replaceChildren(...listing.models.map((model) => {
      const option = document.createElement("option");
      option.value = model.name;
      if (ready(model)) {
        option.textContent = `${model.name} (version ${servedVersion(model)})`;
      } else {
        option.disabled = true; // shown, with why it cannot be chosen
        option.textContent = `${model.name}: ${model.state}${model.reason ? `, ${model.reason}` : ""}`;
      }
      return option;
    }));
    const names = listing.models.filter(ready).map((model) => model.name);
    const chosen = [kept, listing.default_model].find((name) => names.includes(name)) || names[0];
    this.view.choice.value = chosen;
    this.view.picker.hidden = false;
    this.choose(chosen, false);
  }

  choose(name, byPerson) {
    const model = this.models.find((each) => each.name === name);
    if (!model) return;
    this.card = { ...model.card, name: model.name, version: servedVersion(model) };
    showCard(this.view, this.card);
    if (byPerson) this.onChoose(this.card);
  }
}

// The version that answers when none is asked for: the highest served.
function servedVersion(model) {
  const versions = (model.served_versions || []).map(String);
  versions.sort((a, b) => Number(a) - Number(b));
  return versions.length ? versions[versions.length - 1] : "unknown";
}

// ---- the card ----

function showCard(view, card) {
  const parts = [`Model ${card.name} ${card.version}`];
  if (card.engine) parts[0] += ` (engine: ${card.engine})`;
  if (card.description) parts.push(String(card.description).replace(/\.$/, ""));
  const quality = card.quality;
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

  const data = card.training && card.training.data;
  if (data === "synthetic") {
    view.trained.textContent = "This is a demonstration model trained on synthetic scenes (generated textured " +
      "shapes among distractors on cluttered backgrounds), not on photographs: it does well on scenes like the " +
      "samples below and will not segment your cat.";
  } else {
    view.trained.textContent = data ? `This model was trained on ${data}.` : "";
  }
  view.trained.hidden = !view.trained.textContent;
  view.inferred.hidden = card.card !== "inferred";

  const foreground = new Set(card.foreground || []);
  view.classes.replaceChildren(...(card.classes || []).map((name, index) => {
    const item = document.createElement("li");
    const colour = (card.palette || [])[index] || [0, 0, 0];
    item.append(swatch(colour), ` ${name}`);
    if (foreground.has(name)) item.append(" (kept by the cutout)");
    return item;
  }));
  const facts = [
    ["Input", describeInput(card)],
    ["Output", describeOutput(card.output)],
    ["Engine", card.engine],
    ["License", card.license],
    ["Source", card.source],
  ].filter(([, value]) => value !== undefined && value !== null && value !== "");
  view.facts.replaceChildren(...facts.flatMap(([term, value]) => {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.append(describe(value));
    return [dt, dd];
  }));
  view.card.hidden = false;
}

/** A colour's swatch, as in the legend. */
export function swatch(colour) {
  const span = document.createElement("span");
  span.className = "swatch";
  span.style.backgroundColor = `rgb(${colour[0]}, ${colour[1]}, ${colour[2]})`;
  return span;
}

// "256 × 256 pixels, stretched, RGB, (pixel − 0) / 255": what the server does to an image before the network.
function describeInput(card) {
  const input = card.input || {};
  const size = input.size || card.input_size;
  const parts = [];
  if (Array.isArray(size)) parts.push(`${size[0]} × ${size[1]} pixels`);
  if (input.resize) parts.push(input.resize === "letterbox" ? "letterboxed (aspect ratio kept, padded)" : "stretched");
  if (input.channels) parts.push(input.channels);
  if (input.mean !== undefined || input.std !== undefined) {
    parts.push(`(pixel − ${numbers(input.mean ?? 0)}) / ${numbers(input.std ?? 255)}`);
  } else if (card.normalisation) {
    parts.push(card.normalisation);
  }
  return parts.join(", ");
}

function describeOutput(output) {
  if (!output || !output.kind) return "";
  return output.kind === "sigmoid" && output.threshold !== undefined
    ? `sigmoid, threshold ${output.threshold}` : output.kind;
}

// One number for the three channels where they are the same: "255", not "[255, 255, 255]".
function numbers(value) {
  if (!Array.isArray(value)) return String(value);
  return value.every((each) => each === value[0]) ? String(value[0]) : `[${value.join(", ")}]`;
}

// A card's free-form value (license, source) as text; a web address as a link.
function describe(value) {
  if (typeof value === "string" && /^https?:\/\//.test(value)) {
    const link = document.createElement("a");
    link.href = value;
    link.rel = "noreferrer";
    link.textContent = value;
    return link;
  }
  if (Array.isArray(value)) return value.map((each) => (typeof each === "object" ? JSON.stringify(each) : each)).join(", ");
  if (value && typeof value === "object") {
    return Object.entries(value).map(([key, each]) => `${key}: ${typeof each === "object" ? JSON.stringify(each) : each}`)
      .join("; ");
  }
  return String(value);
}
