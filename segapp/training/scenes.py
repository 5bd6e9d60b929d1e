"""Synthetic segmentation scenes: photograph-like images with trimap labels, deterministic from a seed.

A scene is a cluttered background (gradients, smooth noise, stripes, distractor shapes in flat, striped or
checked fills) with 1-3 foreground "animals": blobs, ellipses or polygons filled with a fur-like texture and lit
as solid bodies. Colours are drawn from one distribution for everything, so colour alone never tells an
object from the background; the network has to learn texture, shading and shape. Blur, sensor noise, JPEG
artefacts and occluding distractors make it harder. Labels use the Oxford-IIIT Pet trimap meaning:
0 foreground, 1 background, 2 a border band a few pixels wide on both sides of every object edge.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FOREGROUND, BACKGROUND, BORDER = 0, 1, 2
# The classes by index, with the Oxford-IIIT Pet trimap meaning, and the colours a viewer sees them in: what
# segapp-train writes into the demonstration model's card, whence serving reads them.
CLASS_NAMES = ("foreground", "background", "border")
PALETTE = ((230, 25, 75), (0, 0, 0), (255, 225, 25))

# Seeds of the three splits: index i of split s is generated from default_rng([s, i]), so the splits never
# share a scene and any one scene can be regenerated alone.
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}


def scene(seed: int, index: int, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scene `index` of the stream `seed`: (RGB uint8 HxWx3, trimap uint8 HxW)."""
    rng = np.random.default_rng([seed, index])
    if size is None:
        short = int(rng.integers(96, 481))
        aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
        width, height = (
            (min(640, round(short * aspect)), short) if aspect >= 1 else (short, min(640, round(short / aspect)))
        )
    else:
        width, height = size

    image = _background(rng, width, height)
    fg = np.zeros((height, width), dtype=bool)
    count = int(rng.choice([1, 1, 2, 2, 3]))
    for _ in range(count):
        shape = _object_shape(rng, width, height)
        image = np.where(shape[..., None], _fur(rng, shape, width, height), image)
        fg |= shape
    if rng.random() < 0.3:  # a distractor in front of the animal: what it hides is background
        occluder = _distractor_shape(rng, width, height, scale=0.18)
        image = np.where(occluder[..., None], _distractor_fill(rng, width, height), image)
        fg &= ~occluder

    trimap = _trimap(fg, band=max(1, round(min(width, height) / 128)))
    return _degrade(rng, image), trimap


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Noise in [-1, 1] with about `cells` blobs along the short side (bicubic upsampled lattice)."""
    short = min(width, height)
    gw, gh = max(2, round(cells * width / short)), max(2, round(cells * height / short))
    lattice = rng.uniform(0, 255, size=(gh, gw)).astype(np.uint8)
    field = np.asarray(Image.fromarray(lattice, "L").resize((width, height), Image.BICUBIC), dtype=np.float32)
    return field / 127.5 - 1.0


def _stripes(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A sinusoidal stripe field in [0, 1] at a random angle and period."""
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 40) * min(width, height) / 256
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
    wave = np.sin(phase)
    return (wave > 0).astype(np.float32) if rng.random() < 0.5 else (wave + 1) / 2


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    a, b = _colour(rng), _colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xx / width * np.cos(angle) + yy / height * np.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    image = a * (1 - t[..., None]) + b * t[..., None]
    image += _smooth_noise(rng, width, height, int(rng.integers(2, 12)))[..., None] * rng.uniform(10, 60)
    if rng.random() < 0.4:
        image = image * (1 - 0.5 * _stripes(rng, width, height)[..., None]) + 0.5 * _stripes(rng, width, height)[
            ..., None
        ] * _colour(rng)
    if rng.random() < 0.35:  # fur-like texture in the background too, without the lit body of an animal
        image += _smooth_noise(rng, width, height, int(rng.integers(20, 60)))[..., None] * rng.uniform(10, 30)
    for _ in range(int(rng.integers(1, 7))):
        shape = _distractor_shape(rng, width, height)
        image = np.where(shape[..., None], _distractor_fill(rng, width, height), image)
    return image


def _polygon_points(rng: np.random.Generator, cx: float, cy: float, radius: float, sides: int, wobble: float):
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=sides))
    radii = radius * rng.uniform(1 - wobble, 1, size=sides)
    return [(cx + r * np.cos(t), cy + r * np.sin(t)) for r, t in zip(radii, angles, strict=True)]


def _draw(width: int, height: int, paint) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _object_shape(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A foreground object: a smooth irregular blob, a rotated ellipse or a polygon, 8-35% of the short side."""
    short = min(width, height)
    radius = short * rng.uniform(0.10, 0.35)
    cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
    kind = rng.choice(["blob", "blob", "ellipse", "polygon"])
    if kind == "blob":
        theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        r = np.ones_like(theta)
        for k in range(2, 6):
            r += rng.uniform(0, 0.25 / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        pts = [(cx + radius * ri * np.cos(t), cy + radius * ri * np.sin(t)) for ri, t in zip(r, theta, strict=True)]
    elif kind == "ellipse":
        a, b, rot = radius, radius * rng.uniform(0.4, 1.0), rng.uniform(0, np.pi)
        theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = [
            (
                cx + a * np.cos(t) * np.cos(rot) - b * np.sin(t) * np.sin(rot),
                cy + a * np.cos(t) * np.sin(rot) + b * np.sin(t) * np.cos(rot),
            )
            for t in theta
        ]
    else:
        pts = _polygon_points(rng, cx, cy, radius, int(rng.integers(5, 9)), 0.35)
    return _draw(width, height, lambda d: d.polygon(pts, fill=255))


def _distractor_shape(rng: np.random.Generator, width: int, height: int, scale: float = 0.3) -> np.ndarray:
    """A background thing: rectangle, ellipse, triangle or thick line."""
    short = min(width, height)
    size = short * rng.uniform(0.05, scale)
    cx, cy = rng.uniform(0, 1) * width, rng.uniform(0, 1) * height
    kind = rng.choice(["rect", "ellipse", "triangle", "line"])
    if kind == "rect":
        w, h = size * rng.uniform(0.5, 2), size * rng.uniform(0.5, 2)
        return _draw(width, height, lambda d: d.rectangle([cx - w, cy - h, cx + w, cy + h], fill=255))
    if kind == "ellipse":
        w, h = size * rng.uniform(0.5, 1.5), size * rng.uniform(0.5, 1.5)
        return _draw(width, height, lambda d: d.ellipse([cx - w, cy - h, cx + w, cy + h], fill=255))
    if kind == "triangle":
        pts = _polygon_points(rng, cx, cy, size * 1.5, 3, 0.3)
        return _draw(width, height, lambda d: d.polygon(pts, fill=255))
    end = (cx + rng.uniform(-1, 1) * short, cy + rng.uniform(-1, 1) * short)
    line_width = max(2, round(size * rng.uniform(0.1, 0.4)))
    return _draw(width, height, lambda d: d.line([(cx, cy), end], fill=255, width=line_width))


def _distractor_fill(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Flat, striped or checked colour: textures an animal never has."""
    base = _colour(rng)
    kind = rng.choice(["flat", "stripes", "checks"])
    if kind == "flat":
        return np.broadcast_to(base, (height, width, 3))
    if kind == "stripes":
        return (
            base * (1 - _stripes(rng, width, height)[..., None])
            + _colour(rng) * _stripes(rng, width, height)[..., None]
        )
    cell = max(3, round(min(width, height) * rng.uniform(0.02, 0.08)))
    yy, xx = np.mgrid[0:height, 0:width]
    checks = ((xx // cell + yy // cell) % 2).astype(np.float32)[..., None]
    return base * (1 - checks) + _colour(rng) * checks


def _fur(rng: np.random.Generator, shape: np.ndarray, width: int, height: int) -> np.ndarray:
    """An animal's fill: a base colour (sometimes two-tone patches) with fine fur noise, lit as a solid body."""
    ys, xs = np.nonzero(shape)
    if len(xs) == 0:
        return np.zeros((height, width, 3), dtype=np.float32)
    cx, cy = xs.mean(), ys.mean()
    radius = max(float(np.sqrt(len(xs) / np.pi)), 1.0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / radius**2
    light = rng.uniform(0, 2 * np.pi)
    directional = ((xx - cx) * np.cos(light) + (yy - cy) * np.sin(light)) / radius
    shading = np.clip(1.05 - 0.35 * d2 + 0.2 * directional, 0.35, 1.3)

    base = _colour(rng)
    fill = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if rng.random() < 0.4:  # patches of a second colour, like a calico cat
        patches = (_smooth_noise(rng, width, height, int(rng.integers(3, 8))) > 0.2)[..., None]
        fill = np.where(patches, _colour(rng), fill)
    fur_scale = max(2.0, radius / rng.uniform(3, 8))
    fur = _smooth_noise(rng, width, height, max(4, round(min(width, height) / fur_scale)))
    fill = fill * (1 + 0.25 * fur[..., None]) + 25 * fur[..., None]
    return fill * shading[..., None]


def _trimap(fg: np.ndarray, band: int) -> np.ndarray:
    """Trimap from a foreground mask: a border band of `band` pixels on each side of every edge."""
    mask = Image.fromarray(fg.astype(np.uint8) * 255, "L")
    grown = np.asarray(mask.filter(ImageFilter.MaxFilter(2 * band + 1))) > 0
    shrunk = np.asarray(mask.filter(ImageFilter.MinFilter(2 * band + 1))) > 0
    trimap = np.full(fg.shape, BACKGROUND, dtype=np.uint8)
    trimap[fg] = FOREGROUND
    trimap[grown & ~shrunk] = BORDER
    return trimap


def _degrade(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera-like damage: exposure, blur, sensor noise, JPEG compression."""
    image = image * rng.uniform(0.7, 1.2) + rng.uniform(-25, 25)
    out = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.4:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.8)))
    pixels = np.asarray(out, dtype=np.float32)
    pixels = pixels + rng.normal(0, rng.uniform(2, 12), size=pixels.shape)
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5:
        buffer = io.BytesIO()
        out.save(buffer, format="JPEG", quality=int(rng.integers(40, 92)))
        out = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return np.asarray(out)
