"""Hostile bodies through the real stack (nginx -> uWSGI -> segapp): every one is a JSON 4xx, none a 5xx, and no
worker dies.

Two parts: a named corpus of malformed bodies, each with the answer it must get; and a fuzz run of mutated bodies
of every format Pillow writes, with random `?format=`, Accept and Content-Type, four requests in flight. The fuzz
prints its counts (run with -s) and records them as test properties (--junitxml).
"""

from __future__ import annotations

import http.client
import io
import json
import random
import struct
import threading
import warnings
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

FUZZ_BODIES = 10_000
FUZZ_CONCURRENCY = 4  # nginx bounds requests in flight per address; stay well under it
ERROR_KEYS = {"code", "message", "request_id"}


# --- bodies ---------------------------------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # formats Pillow deprecates (IM) are still what a client may send
        image.save(out, format=fmt, **options)
    return out.getvalue()


def picture(width: int = 48, height: int = 32, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(width * 31 + height)
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // width, ys * 255 // height, (xs * ys) % 256], axis=-1)
    pixels = pixels + rng.integers(-9, 9, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int, depth: int = 1, colour: int = 0) -> bytes:
    """A PNG whose header says width x height, with one compressed row of data: a bomb by its header."""
    idat = zlib.compress(bytes(1 + (width * depth + 7) // 8))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def with_size_field(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    """`data` with the integers `values` packed as `fmt` at `offset` (a header's width and height)."""
    patched = bytearray(data)
    struct.pack_into(fmt, patched, offset, *values)
    return bytes(patched)


def jpeg_frame_resized(data: bytes, width: int, height: int) -> bytes:
    frame = data.index(b"\xff\xc0")
    return with_size_field(data, frame + 5, ">HH", height, width)


def tiff_with_float_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag claims the FLOAT type: Pillow's plugin raises TypeError on it."""
    data = bytearray(encoded(picture(), "TIFF"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for index in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * index
        if struct.unpack_from("<H", data, entry)[0] == 273:
            struct.pack_into("<H", data, entry + 2, 11)
    return bytes(data)


def multipart(*fields: tuple[str, str | None, bytes], boundary: str = "hostileBoundary") -> bytes:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
        + (f'; filename="{filename}"'.encode() if filename else b"") + b"\r\n\r\n" + content + b"\r\n"
        for name, filename, content in fields
    )
    return body + f"--{boundary}--\r\n".encode()


FORM = "multipart/form-data; boundary=hostileBoundary"
# The formats segapp takes, then formats Pillow reads that segapp refuses by name (415), even cut in half; an icon
# cut in half names no format (400).
TRUNCATED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "TGA", "PCX", "ICO", "JPEG2000", "PPM", "SGI",
                     "QOI", "DDS")
REFUSED_FORMATS = ("TGA", "PCX", "JPEG2000", "PPM", "SGI", "QOI", "DDS")


def corpus() -> list[tuple[str, bytes, dict, str, int]]:
    """(name, body, headers, query, expected status) of malformed requests."""
    jpeg = encoded(picture(400, 300), "JPEG")
    large_jpeg = encoded(picture(2000, 1500), "JPEG")
    progressive = encoded(picture(400, 300), "JPEG", progressive=True)
    png = encoded(picture(), "PNG")
    tiff, bmp, gif = encoded(picture(), "TIFF"), encoded(picture(), "BMP"), encoded(picture(mode="P"), "GIF")
    cases = []
    for fmt in TRUNCATED_FORMATS:
        mode = "RGBA" if fmt in ("ICO", "QOI") else "RGB"
        whole = encoded(picture(mode=mode), fmt)
        status = 415 if fmt in REFUSED_FORMATS else 400
        cases.append((f"truncated-half-{fmt.lower()}", whole[: len(whole) // 2], {}, "", status))
    for fmt in ("JPEG", "PNG", "GIF", "TIFF", "WEBP"):
        whole = encoded(picture(), fmt)
        cases.append((f"truncated-to-16-bytes-{fmt.lower()}", whole[:16], {}, "?format=overlay", 400))
    second_scan = progressive.index(b"\xff\xda", progressive.index(b"\xff\xda") + 2)
    cases += [
        ("jpeg-3mp-cut-to-20k-with-new-end-marker", large_jpeg[:20_000] + b"\xff\xd9", {}, "?format=overlay", 400),
        ("jpeg-progressive-cut-after-first-scan", progressive[:second_scan] + b"\xff\xd9", {}, "", 400),
        ("jpeg-header-claims-6000x6000", jpeg_frame_resized(jpeg, 6000, 6000), {}, "?format=overlay", 400),
        ("jpeg-without-frame", b"\xff\xd8\xff\xd9", {}, "", 400),
        ("jpeg-magic-only", b"\xff\xd8\xff", {}, "", 400),
        ("png-magic-only", b"\x89PNG\r\n\x1a\n", {}, "", 400),
        ("gif-magic-only", b"GIF89a", {}, "", 400),
        ("tiff-magic-only", b"II*\x00", {}, "", 400),
        ("bmp-magic-only", b"BM", {}, "", 400),
        ("webp-magic-only", b"RIFF\x00\x00\x00\x00WEBP", {}, "", 400),
        ("png-body-with-jpeg-magic", b"\xff\xd8\xff\xe0" + png[4:], {}, "", 400),
        ("jpeg-body-with-png-magic", b"\x89PNG\r\n\x1a\n" + jpeg[8:], {}, "", 400),
        ("jpeg-body-with-gif-magic", b"GIF89a" + jpeg[6:], {}, "", 413),  # JPEG bytes read as a vast screen
        ("png-with-bad-crc", png[:29] + b"\x00\x00\x00\x00" + png[33:], {}, "", 400),
        ("random-4k", random.Random(1).randbytes(4096), {}, "", 400),
        ("zeros-4k", bytes(4096), {}, "", 400),
        ("ones-4k", b"\xff" * 4096, {}, "", 400),
        ("one-byte", b"\x00", {}, "", 400),
        ("text-body", b"hello, this is not an image", {}, "", 400),
        ("html-body", b"<html><body>not an image</body></html>", {}, "", 400),
        ("json-body-as-image", b'{"image": "base64"}', {}, "", 400),
        ("empty-body", b"", {}, "", 400),
        ("png-bomb-50000x50000", png_header_only(50_000, 50_000), {}, "", 413),
        ("png-bomb-rgb-20000x20000", png_header_only(20_000, 20_000, depth=8, colour=2), {}, "", 413),
        ("png-bomb-just-over-limit", png_header_only(8000, 5001), {}, "?format=overlay", 413),
        ("gif-bomb-65535x65535", with_size_field(gif, 6, "<HH", 65535, 65535), {}, "", 413),
        ("bmp-bomb-30000x30000", with_size_field(bmp, 18, "<ii", 30_000, 30_000), {}, "", 413),
        ("jpeg-bomb-65500x65500", jpeg_frame_resized(jpeg, 65_500, 65_500), {}, "", 413),
        # As a real PNG, 116 KB: resizing it to the network's input would take Pillow 640 MB of coefficients
        ("png-40000000x1", png_header_only(40_000_000, 1), {}, "", 413),
        ("png-1x40000000", png_header_only(1, 40_000_000), {}, "?format=json", 413),
        ("png-wide-70000-overlay", png_header_only(70_000, 2), {}, "?format=overlay", 413),
        ("tiff-tall-327704-overlay", encoded(Image.new("L", (8, 327_704)), "TIFF"), {}, "?format=overlay", 413),
        ("png-zero-width", png_header_only(0, 10), {}, "", 400),
        ("png-zero-height", png_header_only(10, 0), {}, "", 400),
        ("tga-zero-size", with_size_field(encoded(picture(), "TGA"), 12, "<HH", 0, 0), {}, "", 400),
        ("bmp-zero-size", with_size_field(bmp, 18, "<ii", 0, 0), {}, "", 400),
        ("bmp-negative-width", with_size_field(bmp, 18, "<i", -48), {}, "", 413),  # read as 4 billion
        ("tiff-float-strip-offsets", tiff_with_float_strip_offsets(), {}, "?format=overlay", 400),
        ("tiff-offset-past-end", with_size_field(tiff, 4, "<I", 0x7FFFFFF0), {}, "", 400),
        ("multipart-without-image-field", multipart(("photo", "a.png", png)), {"Content-Type": FORM}, "", 400),
        ("multipart-image-as-text", multipart(("image", None, b"abc")), {"Content-Type": FORM}, "", 400),
        ("multipart-two-image-fields", multipart(("image", "a.png", png), ("image", "b.png", png)),
         {"Content-Type": FORM}, "", 400),
        ("multipart-200-fields", multipart(*[("f", None, b"x")] * 200, ("image", "a.png", png)),
         {"Content-Type": FORM}, "", 400),
        ("multipart-140000-fields", multipart(*[("f", None, b"")] * 140_000), {"Content-Type": FORM}, "", 400),
        ("multipart-no-boundary", multipart(("image", "a.png", png)), {"Content-Type": "multipart/form-data"}, "", 400),
        ("multipart-unclosed", multipart(("image", "a.png", png))[:-20], {"Content-Type": FORM}, "", 400),
        ("multipart-garbage", b"garbage" * 100, {"Content-Type": FORM}, "", 400),
        ("multipart-truncated-image", multipart(("image", "a.jpg", jpeg[:500])), {"Content-Type": FORM}, "", 400),
        ("content-length-shorter-than-body", jpeg, {"Content-Length": "1000"}, "", 400),
        ("content-type-text-plain", png, {"Content-Type": "text/plain"}, "", 415),
        ("content-type-json", png, {"Content-Type": "application/json"}, "", 415),
        ("unknown-format-parameter", png, {}, "?format=bmp", 400),
        ("format-parameter-not-utf8", png, {}, "?format=%ff", 400),
        ("accept-nothing-offered", png, {"Accept": "text/html"}, "", 406),
        ("accept-every-q-zero", png, {"Accept": "image/png;q=0, application/json;q=0, image/jpeg;q=0"}, "", 406),
    ]
    return cases


CORPUS = corpus()


# --- the corpus -----------------------------------------------------------------------------------------------


def assert_json_error(answer, status: int, name: str) -> None:
    assert answer.status == status, (name, answer.status, answer.body[:300])
    assert answer.headers.get("Content-Type", "").startswith("application/json"), (name, answer.body[:300])
    assert set(json.loads(answer.body)["error"]) == ERROR_KEYS, name


def test_corpus_is_large_and_named_uniquely():
    names = [case[0] for case in CORPUS]
    assert len(names) >= 60 and len(set(names)) == len(names)


def deaths(stack) -> int:
    """Workers that died so far: uWSGI logs "DAMN ! worker N (pid: P) died" for each (a max-requests recycle,
    which changes a worker's pid too, says "Seeya" instead)."""
    return stack.log().count("DAMN")


@pytest.mark.parametrize("name, body, headers, query, status", CORPUS, ids=[case[0] for case in CORPUS])
def test_malformed_body_gets_its_json_4xx(stack, name, body, headers, query, status):
    answer = stack.infer(body, query=query, headers={"Content-Type": "image/jpeg", **headers})
    assert_json_error(answer, status, name)


# --- the fuzz -------------------------------------------------------------------------------------------------


def fuzz_seeds() -> list[bytes]:
    """Small images in every format Pillow writes and reads back, in a few modes each."""
    Image.init()
    seeds = []
    for fmt in sorted(Image.SAVE):
        for mode in ("RGB", "L", "P", "RGBA", "1"):
            try:
                data = encoded(picture(32, 24, mode), fmt)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    Image.open(io.BytesIO(data)).load()
            except Exception:  # a mode the format cannot hold, or a format Pillow only writes
                continue
            seeds.append(data)
    return seeds


def mutate(data: bytes, rng: random.Random) -> bytes:
    """`data` with a few byte flips, insertions, deletions, header-field overwrites or a truncation."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        # Headers hold the fields that matter (sizes, offsets, counts): aim there most of the time.
        where = rng.randrange(min(len(data), 64)) if rng.random() < 0.6 else rng.randrange(len(data))
        action = rng.random()
        if action < 0.55:
            data[where] = rng.randrange(256)
        elif action < 0.65:
            data[where:where] = rng.randbytes(rng.randint(1, 8))
        elif action < 0.75:
            del data[where : where + rng.randint(1, 16)]
        elif action < 0.85:
            del data[max(1, rng.randrange(len(data))) :]
        else:
            data[where : where + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff",
                                                  b"\x00\x01\x00\x00", b"\xff\xff", b"\x00\x00"])
        if not data:
            data = bytearray(b"\x00")
    return bytes(data)


QUERIES = ("", "", "?format=png", "?format=json", "?format=overlay", "?format=gif")
ACCEPTS = (None, "*/*", "image/png", "application/json", "image/jpeg", "image/*;q=0.5, application/json",
           "text/html", "*/*;q=abc", ";;,,", "image/")
CONTENT_TYPES = (None, "image/jpeg", "image/png", "image/*", "application/octet-stream", "image/x-anything",
                 "multipart/form-data; boundary=x", "text/plain")


def fuzz(port: int, seeds: list[bytes], count: int, workers: int) -> Counter:
    """Send `count` mutated bodies from `workers` threads, each on a keep-alive connection; count the answers."""
    counts, lock = Counter(), threading.Lock()
    jobs = iter(range(count))

    def run(thread: int) -> None:
        rng = random.Random(thread)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                if next(jobs, None) is None:
                    break
            body = mutate(rng.choice(seeds), rng)
            headers = {"Content-Type": rng.choice(CONTENT_TYPES), "Accept": rng.choice(ACCEPTS)}
            headers = {name: value for name, value in headers.items() if value is not None}
            outcome = Counter(sent=1)
            # Sent once, never again: a reset or a closed connection is exactly what the fuzz is here to catch. An
            # answer that closes its connection says so (Connection: close), and http.client opens the next itself.
            try:
                connection.request("POST", "/infer" + rng.choice(QUERIES), body=body, headers=headers)
                response = connection.getresponse()
                answer = response.read()
            except (http.client.HTTPException, OSError) as error:
                outcome["unanswered"] += 1
                outcome[f"error_{type(error).__name__}"] += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                with lock:
                    counts.update(outcome)
                continue
            outcome["answered"] += 1
            outcome[f"status_{response.status}"] += 1
            if response.status >= 500:
                outcome["5xx"] += 1
            if response.status >= 400 and not _is_json_error(response, answer):
                outcome["non_json_errors"] += 1
            with lock:
                counts.update(outcome)
        connection.close()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts


def _is_json_error(response, body: bytes) -> bool:
    if not response.getheader("Content-Type", "").startswith("application/json"):
        return False
    try:
        return set(json.loads(body)["error"]) == ERROR_KEYS
    except (ValueError, KeyError, TypeError):
        return False


def test_fuzzed_bodies_of_every_format_get_no_5xx_and_kill_no_worker(stack, record_property):
    seeds = fuzz_seeds()
    deaths_before = deaths(stack)
    counts = fuzz(stack.port, seeds, FUZZ_BODIES, FUZZ_CONCURRENCY)
    died = deaths(stack) - deaths_before
    summary = {
        "seeds": len(seeds), "sent": counts["sent"], "answered": counts["answered"],
        "unanswered": counts["unanswered"], "5xx": counts["5xx"], "non_json_errors": counts["non_json_errors"],
        "worker_deaths": died,
        **{key: value for key, value in sorted(counts.items()) if key.startswith(("status_", "error_"))},
    }
    for key, value in summary.items():
        record_property(key, value)
    print("\nhostile fuzz through nginx:", json.dumps(summary))
    # Every body sent is either answered or counted unanswered (with its exception): none may be unanswered.
    assert counts["sent"] == FUZZ_BODIES == counts["answered"] + counts["unanswered"], summary
    assert counts["unanswered"] == 0, summary
    assert counts["5xx"] == 0 and counts["non_json_errors"] == 0 and died == 0, summary
    assert counts["status_200"] > 0 and counts["status_400"] > 0, summary  # the fuzz reached both sides


def test_stack_still_serves_after_the_corpus_and_the_fuzz(stack, jpeg):
    for _ in range(4):  # both workers
        answer = stack.infer(jpeg)
        assert answer.status == 200 and answer.headers["Content-Type"] == "image/png"
    assert deaths(stack) == 0
    assert len(stack.worker_pids()) == 2
