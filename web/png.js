// The mask PNG the server answers holds class indices, not colours: read them, and paint them in the card's colours.

/** Paint class indices with the class colours, opaque. */
export function paintIndices(canvas, indices, colours) {
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

/** A palette PNG's class indices and palette, or null when this browser cannot inflate it or it is not one. */
export async function decodePalettePng(bytes) {
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

/** The bytes of a base64 string (the JSON answer's mask). */
export function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
