"""Write the README's pictures, each made by the server's own code.

scene (docs/images/scene-mask-overlay.png): a held-out synthetic scene as the server gets it (a JPEG), the mask the
shipped model answers for it, and the overlay `?format=overlay` answers, side by side. The scene is the first of
web/samples/ (test split of segapp.training.scenes, never trained on); the mask and the overlay come from
Segmenter.segment, mask_to_png and overlay, with the model card's palette.

astronaut (docs/images/astronaut-cutout.png): NASA's portrait that scikit-image ships (skimage.data.astronaut()) and
the answer of `POST /infer?model=person&format=cutout` for it, the app called in-process (WebTest) on the shipped
repository, so the person model must be there (`make models`); the cutout lies on a light checkerboard so that its
transparent pixels show. Run from the repository root:
    .venv/bin/python docs/images/make_pictures.py [--model segapp/models/unet.tflite] [--index 0]
    .venv/bin/python docs/images/make_pictures.py --picture astronaut
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from segapp.inference import SHIPPED_MODEL, Segmenter
from segapp.masks import mask_to_png, overlay
from segapp.training import scenes

HERE = Path(__file__).resolve().parent
OUT = {"scene": HERE / "scene-mask-overlay.png", "astronaut": HERE / "astronaut-cutout.png"}
PANEL_HEIGHT = 300
GAP = 8
CAPTION = 26
# The README's pictures stay small; a palette of 256 colours keeps a photo panel's look at a third of the bytes.
MAX_BYTES = 200_000
# The checkerboard under a cutout: light greys, as image editors show transparency.
CHECKER = ((244, 244, 244), (218, 218, 218))
CHECKER_SQUARE = 12


def scene_jpeg(index: int, quality: int = 85) -> bytes:
    """Test scene `index` as the JPEG a client would send (as web/make_samples.py writes it)."""
    pixels, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], index)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def panels(jpeg: bytes, model: Path) -> list[tuple[str, Image.Image]]:
    """(caption, image) for the input, the mask PNG and the overlay, each at the input's size."""
    segmenter = Segmenter(model).load()
    palette = segmenter.card["palette"]
    result = segmenter.segment(jpeg, full_pixels=True)
    photo = result.image.copy()
    with Image.open(io.BytesIO(mask_to_png(result.mask, palette))) as mask:
        mask_rgb = mask.convert("RGB")
    blended = overlay(result.image, result.mask, palette)
    card = segmenter.card
    return [
        ("the JPEG sent to POST /infer", photo),
        (f"the mask PNG ({card['name']} {card['version']})", mask_rgb),
        ("?format=overlay", blended),
    ]


def astronaut_panels() -> list[tuple[str, Image.Image]]:
    """(caption, image) for the astronaut photograph and its cutout by the person model, on a checkerboard."""
    from skimage import data
    from webtest import TestApp

    from segapp.config import Settings
    from segapp.wsgi import make_app

    pixels = data.astronaut()
    photo = io.BytesIO()
    Image.fromarray(pixels).save(photo, "PNG")
    app = TestApp(make_app(Settings()))
    answer = app.post("/infer?model=person&format=cutout", photo.getvalue(), headers={"Content-Type": "image/png"},
                      status=200)
    with Image.open(io.BytesIO(answer.body)) as cutout:
        on_checker = Image.alpha_composite(checkerboard(cutout.size), cutout.convert("RGBA")).convert("RGB")
    return [
        ("skimage.data.astronaut(), sent as a PNG", Image.fromarray(pixels)),
        (f"?model=person&format=cutout ({answer.headers['X-Model']})", on_checker),
    ]


def checkerboard(size: tuple[int, int]) -> Image.Image:
    """An RGBA checkerboard of CHECKER's greys, `size` (width, height)."""
    width, height = size
    board = Image.new("RGBA", size, CHECKER[0])
    draw = ImageDraw.Draw(board)
    for top in range(0, height, CHECKER_SQUARE):
        for left in range(0, width, CHECKER_SQUARE):
            if (top // CHECKER_SQUARE + left // CHECKER_SQUARE) % 2:
                draw.rectangle((left, top, left + CHECKER_SQUARE - 1, top + CHECKER_SQUARE - 1), fill=CHECKER[1])
    return board


def side_by_side(items: list[tuple[str, Image.Image]]) -> Image.Image:
    """The images scaled to one height, left to right, each with its caption under it."""
    scaled = []
    for caption, image in items:
        width = round(image.width * PANEL_HEIGHT / image.height)
        resample = Image.NEAREST if caption.startswith("the mask") else Image.BILINEAR
        scaled.append((caption, image.resize((width, PANEL_HEIGHT), resample)))
    total = sum(image.width for _, image in scaled) + GAP * (len(scaled) + 1)
    sheet = Image.new("RGB", (total, PANEL_HEIGHT + CAPTION + 2 * GAP), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=15)
    left = GAP
    for caption, image in scaled:
        sheet.paste(image, (left, GAP))
        draw.text((left, GAP + PANEL_HEIGHT + 6), caption, fill=(30, 35, 48), font=font)
        left += image.width + GAP
    return sheet


def save_small(image: Image.Image, path: Path) -> int:
    """Save as PNG, as a 256-colour palette image when the full-colour one is over MAX_BYTES; returns bytes."""
    image.save(path, optimize=True)
    if path.stat().st_size > MAX_BYTES:
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--picture", choices=sorted(OUT), default="scene", help="which picture (default: scene)")
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL,
                        help="scene: the model file (.tflite or .keras)")
    parser.add_argument("--index", type=int, default=0, help="scene: the test scene (web/samples/scene-N.jpg)")
    parser.add_argument("--out", type=Path, help="where to write it (default: docs/images/<the picture's name>)")
    args = parser.parse_args(argv)
    out = args.out or OUT[args.picture]
    items = astronaut_panels() if args.picture == "astronaut" else panels(scene_jpeg(args.index), args.model)
    size = save_small(side_by_side(items), out)
    print(f"{out}: {size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
