"""Issue 15's hostile requests through the real stack (nginx -> uWSGI -> segapp): each is answered in JSON within its
budget, no worker dies, and a well-behaved client beside them is answered within a second.

On main 723bb99 each of these took a worker for seconds (scans, comments, chunks: 2.5-59 s, two harakiri kills),
was a 502 (a path that is not UTF-8) or a 500 (JSON nested 1000 deep), cost hundreds of MB (tiny JPEG 2000, WebP,
AVIF), answered 80 MB of JSON, or was accepted though malformed (header length " 111 ", UTF-16, duplicate keys).
"""

from __future__ import annotations

import json
import random
import statistics
import struct
import threading
import time

import pytest
from PIL import Image, ImageDraw

from tests import hostile

V2_INFER = "/v2/models/segapp-unet/infer"
BINARY_MASK = [{"name": "mask", "parameters": {"binary_data": True}}]
# A hostile request is answered within this (the decode budget is 2 s; each below was seconds to minutes before).
ANSWERED_WITHIN_S = 5.0


def flat_png(width: int, height: int) -> bytes:
    """A PNG of few bytes and many pixels: a disc on a flat background."""
    image = Image.new("RGB", (width, height), (40, 90, 160))
    ImageDraw.Draw(image).ellipse((width // 5, height // 5, width * 4 // 5, height * 4 // 5), fill=(200, 170, 120))
    return hostile.encoded(image, "PNG", compress_level=9)


def v2_bytes(files: list[bytes], outputs: list | None = None, shape: list[int] | None = None) -> tuple[dict, bytes]:
    """A binary /v2 request of BYTES images (of shape [len(files)] unless given): (headers, body)."""
    data = b"".join(struct.pack("<I", len(f)) + f for f in files)
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": shape or [len(files)],
                           "parameters": {"binary_data_size": len(data)}}]}
    if outputs is not None:
        request["outputs"] = outputs
    header = json.dumps(request).encode()
    return ({"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
            header + data)


def v2_json(text: bytes) -> tuple[dict, bytes]:
    return {"Content-Type": "application/json"}, text


def hostile_requests() -> list[tuple[str, str, str, dict, bytes, int, str]]:
    """(name, method, path, headers, body, status, error code or message part) of each hostile request."""
    forty_mp = flat_png(7300, 5440)
    valid = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 2, 3], "data": [0] * 12}]})
    image = {"Content-Type": "image/jpeg"}
    empty_elements = v2_bytes([b""] * 2_600_000, shape=[1])
    cases = [
        ("jpeg-300-repeated-scans", "POST", "/infer", image, hostile.repeated_scan_jpeg(300), 413,
         "decode_budget_exceeded"),
        ("jpeg-2000-repeated-scans", "POST", "/infer", image, hostile.repeated_scan_jpeg(2000), 400,
         "undecodable_image"),
        ("jpeg-2600000-comments", "POST", "/infer", image, hostile.comment_flood_jpeg(2_600_000), 400,
         "undecodable_image"),
        ("png-800000-chunks", "POST", "/infer", image, hostile.chunk_flood_png(800_000), 400, "undecodable_image"),
        ("jpeg2000-6324x6324", "POST", "/infer", image, hostile.tiny_jpeg2000(), 415, "unsupported_image_format"),
        ("webp-lossless-16383x2441", "POST", "/infer", image, hostile.tiny_lossless_webp(), 413,
         "decode_budget_exceeded"),
        ("avif-6324x6324", "POST", "/infer", image,
         hostile.encoded(Image.new("RGB", (6324, 6324)), "AVIF", quality=0), 415, "unsupported_image_format"),
        ("v2-json-answer-of-40mp", "POST", V2_INFER, *v2_bytes([forty_mp]), 413, "ask for it as binary data"),
        ("v2-json-answer-of-32-pngs", "POST", V2_INFER, *v2_bytes([flat_png(1250, 1000)] * 32), 413,
         "ask for it as binary data"),
        ("v2-batch-of-two-39mp-pngs", "POST", V2_INFER, *v2_bytes([flat_png(7000, 5600)] * 2), 413,
         "over the limit of 40000000"),
        # Each image alone is within the budgets (900 scans of 2 megapixels: about 1.7 s); together, minutes.
        ("v2-batch-of-20-scan-heavy-jpegs", "POST", V2_INFER,
         *v2_bytes([hostile.repeated_scan_jpeg(900, side=1400)] * 20, BINARY_MASK), 413, "budget"),
        ("v2-2600000-empty-bytes-elements", "POST", V2_INFER, *empty_elements, 400, "more than the 1 elements"),
        ("v2-data-nested-990-deep", "POST", V2_INFER,
         *v2_json(b'{"inputs": [{"name": "image", "data": ' + b"[" * 990 + b"]" * 990 + b"}]}"), 400, "nests"),
        ("v2-parameters-nested-5000-deep", "POST", V2_INFER,
         *v2_json(b'{"parameters": ' + b"[" * 5000 + b"]" * 5000 + b"}"), 400, "nests"),
        ("v2-id-nested-100000-deep", "POST", V2_INFER, *v2_json(b'{"id": ' + b"[" * 100_000 + b"}"), 400, "nests"),
        ("v2-body-of-100000-brackets", "POST", V2_INFER, *v2_json(b"[" * 100_000), 400, "nests"),
        ("v2-object-of-700000-keys", "POST", V2_INFER,
         *v2_json(b"{" + b",".join(b'"k%d":0' % i for i in range(700_000)) + b"}"), 400, "keys"),
        ("v2-utf16-body", "POST", V2_INFER, *v2_json(valid.encode("utf-16")), 400, "not UTF-8"),
        ("v2-bom-body", "POST", V2_INFER, *v2_json(b"\xef\xbb\xbf" + valid.encode()), 400, "BOM"),
        ("v2-duplicate-inputs", "POST", V2_INFER, *v2_json(valid[:-1].encode() + b', "inputs": []}'), 400, "twice"),
        ("v2-data-beside-binary-data-size", "POST", V2_INFER,
         *v2_json(valid.replace('"data"', '"parameters": {"binary_data_size": 12}, "data"').encode()), 400,
         "both 'data' and a binary_data_size"),
        ("v2-empty-model-name", "POST", "/v2/models//infer", *v2_json(valid.encode()), 404, ""),
        ("v2-empty-version", "POST", "/v2/models/segapp-unet/versions//infer", *v2_json(valid.encode()), 404, ""),
    ]
    # (Spaces around a header value are not part of it in HTTP: nginx passes " 200 " as "200".)
    for length in ("+200", "0_200", "2e2"):
        body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 2, 3],
                                       "parameters": {"binary_data_size": 12}}]}).encode()
        cases.append((f"v2-header-length-{length}", "POST", V2_INFER,
                      {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": length},
                      body.ljust(200) + bytes(12), 400, "decimal digits"))
    for method in ("GET", "HEAD", "POST"):
        for path in ("/%ff", "/healthz%ff", "/metrics%ff", "/v2/%ff", "/%c0%af"):
            cases.append((f"path-{method}-{path}", method, path, image, b"" if method != "POST" else b"x", 400,
                          "bad_path"))
    return cases


CASES = hostile_requests()


def deaths(stack) -> int:
    return stack.log().count("DAMN")


def assert_answered_as(answer, method: str, status: int, says: str, name: str) -> None:
    assert answer.status == status, (name, answer.status, answer.body[:300])
    assert answer.headers.get("Content-Type", "").startswith("application/json"), (name, answer.body[:300])
    if method != "HEAD":
        assert says in answer.body.decode(), (name, answer.body[:300])
        assert b"Traceback" not in answer.body


@pytest.mark.parametrize("name, method, path, headers, body, status, says", CASES, ids=[case[0] for case in CASES])
def test_hostile_request_is_answered_in_json_within_its_budget(stack, name, method, path, headers, body, status,
                                                               says):
    before = deaths(stack)
    started = time.monotonic()
    answer = stack.request(method, path, body, headers, timeout=60)
    elapsed = time.monotonic() - started
    assert_answered_as(answer, method, status, says, name)
    assert elapsed < ANSWERED_WITHIN_S, (name, elapsed)
    assert deaths(stack) == before


def test_raw_path_byte_0xff_is_a_json_400(stack):
    answer = stack.raw(b"GET /\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert_answered_as(answer, "GET", 400, "bad_path", "raw 0xff")


def test_forty_megapixel_answers_stay_served(stack):
    """What is within the budgets is served: the 40 MP PNG's JSON answer on /infer, its mask as binary on /v2."""
    forty_mp = flat_png(7300, 5440)
    answer = stack.infer(forty_mp, "?format=json", {"Content-Type": "image/png"}, timeout=120)
    assert answer.status == 200 and (answer.json()["width"], answer.json()["height"]) == (7300, 5440)
    headers, body = v2_bytes([forty_mp], BINARY_MASK)
    answer = stack.request("POST", V2_INFER, body, headers, timeout=120)
    length = int(answer.headers["Inference-Header-Content-Length"])
    assert answer.status == 200 and len(answer.body) - length == 7300 * 5440


# Kinds whose every request is refused; 4 of each kind are kept in flight while the bystander measures.
BYSTANDER_KINDS = ("jpeg-300-repeated-scans", "jpeg-2600000-comments", "png-800000-chunks", "jpeg2000-6324x6324",
                   "webp-lossless-16383x2441", "avif-6324x6324", "v2-batch-of-two-39mp-pngs",
                   "v2-2600000-empty-bytes-elements", "v2-data-nested-990-deep", "v2-object-of-700000-keys",
                   "path-POST-/%ff")
HOSTILE_IN_FLIGHT = 4
SECONDS_PER_KIND = 2.0


def test_bystander_is_answered_within_a_second_while_hostile_requests_run(stack):
    """For each kind, 4 hostile requests are kept in flight for 2 s from 127.0.0.1 while a well-behaved client on
    127.0.0.2 (another address: the per-address limits are not what is measured) sends /healthz and a 4x4 PNG
    one after another. Every request is counted: sent = answered + failed, for both sides; the bystander's p99."""
    cases = {case[0]: case for case in CASES}
    small = hostile.encoded(Image.new("RGB", (4, 4), (10, 200, 30)), "PNG")
    counts = {"hostile_sent": 0, "hostile_answered": 0, "hostile_failed": 0, "hostile_unexpected": 0,
              "bystander_sent": 0, "bystander_answered": 0, "bystander_failed": 0}
    latencies: list[float] = []
    lock = threading.Lock()
    before = deaths(stack)

    def attack(case, stop: threading.Event) -> None:
        name, method, path, headers, body, status, _ = case
        while not stop.is_set():
            with lock:
                counts["hostile_sent"] += 1
            try:
                answer = stack.request(method, path, body, headers, timeout=60)
            except OSError:
                with lock:
                    counts["hostile_failed"] += 1
                continue
            with lock:
                counts["hostile_answered"] += 1
                counts["hostile_unexpected"] += answer.status != status

    for kind in BYSTANDER_KINDS:
        stop = threading.Event()
        threads = [threading.Thread(target=attack, args=(cases[kind], stop)) for _ in range(HOSTILE_IN_FLIGHT)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + SECONDS_PER_KIND
        turn = 0
        while time.monotonic() < deadline:
            turn += 1
            counts["bystander_sent"] += 1
            started = time.monotonic()
            try:
                if turn % 2:
                    answer = stack.request("GET", "/healthz", timeout=30, source="127.0.0.2")
                else:
                    answer = stack.infer(small, headers={"Content-Type": "image/png"}, timeout=30,
                                         source="127.0.0.2")
            except OSError:
                counts["bystander_failed"] += 1
                continue
            latencies.append(time.monotonic() - started)
            counts["bystander_answered" if answer.status == 200 else "bystander_failed"] += 1
        stop.set()
        for thread in threads:
            thread.join()

    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    summary = {**counts, "bystander_p50_ms": round(statistics.median(latencies) * 1000, 1),
               "bystander_p99_ms": round(p99 * 1000, 1), "worker_deaths": deaths(stack) - before}
    print("\nbystander beside hostile requests:", json.dumps(summary))
    assert counts["bystander_sent"] == counts["bystander_answered"] + counts["bystander_failed"], summary
    assert counts["hostile_sent"] == counts["hostile_answered"] + counts["hostile_failed"], summary
    # 0 failed is measured: every bystander request answered 200, every hostile one its own 4xx.
    assert counts["bystander_failed"] == 0 and counts["hostile_failed"] == 0, summary
    assert counts["hostile_unexpected"] == 0, summary
    assert p99 < 1.0, summary
    assert summary["worker_deaths"] == 0, summary


def test_stack_still_serves_both_workers(stack):
    small = hostile.encoded(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG")
    for _ in range(4):
        assert stack.infer(small).status == 200
    assert len(stack.worker_pids()) == 2



# --- a fuzz over structure: JPEG markers and scans, PNG chunks, /v2 JSON ------------------------------------------

STRUCTURE_FUZZ_BODIES = 1_500
STRUCTURE_FUZZ_CONCURRENCY = 4


def jpeg_segments(data: bytes) -> list[bytes]:
    """A JPEG cut at its markers (each segment with its marker; a scan with its entropy-coded data)."""
    cuts = [0] + [i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] not in (0x00, 0xFF)
                  and not 0xD0 <= data[i + 1] <= 0xD7] + [len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def png_chunks(data: bytes) -> list[bytes]:
    chunks, position = [data[:8]], 8
    while position + 12 <= len(data):
        end = position + 12 + int.from_bytes(data[position : position + 4], "big")
        chunks.append(data[position:end])
        position = end
    return chunks


def rearranged(parts: list[bytes], rng) -> bytes:
    """`parts` with some repeated (many times), dropped, swapped or moved: the file's structure mutated."""
    parts = list(parts)
    for _ in range(rng.randint(1, 4)):
        if len(parts) < 3:
            break
        at = rng.randrange(1, len(parts))
        action = rng.random()
        if action < 0.4:
            parts[at:at] = [parts[at]] * rng.choice((1, 2, 10, 100, 1000))
        elif action < 0.6:
            del parts[at]
        elif action < 0.8:
            other = rng.randrange(1, len(parts))
            parts[at], parts[other] = parts[other], parts[at]
        else:
            parts.insert(rng.randrange(1, len(parts)), parts.pop(at))
    return b"".join(parts)


def json_mutant(rng) -> bytes:
    """A /v2 request whose JSON is nested, repeated, retyped or cut in random places."""
    tensor = {"name": "image", "datatype": rng.choice(["UINT8", "BYTES", "FP32"]),
              "shape": rng.choice([[2, 2, 3], [1, 2, 2, 3], [1], [], [-1], [2, 2]]), "data": [0] * 12}
    request = {"inputs": [tensor], "id": "x", "parameters": {}, "outputs": [{"name": "mask"}]}
    text = json.dumps(request)
    for _ in range(rng.randint(1, 3)):
        at = rng.randint(0, len(text))
        action = rng.random()
        if action < 0.3:
            depth = rng.choice((5, 40, 1000, 50_000))
            text = text[:at] + "[" * depth + "]" * depth + text[at:]
        elif action < 0.5:
            text = text[:at] + "".join(f'"k{i}":{i},' for i in range(rng.choice((3, 300, 30_000)))) + text[at:]
        elif action < 0.7:
            text = text[:at] + rng.choice(['"', "{", "}", "[", "]", ",", ":", "\\", "\ufeff", "\x00"]) + text[at:]
        elif action < 0.85:
            text = text[:at]
        else:
            text = text.replace('"name"', '"name": "image", "name"', 1)
    return text.encode("utf-8", "surrogatepass")


def test_structure_fuzz_gets_no_5xx_and_no_slow_answer(stack, record_property):
    """Progressive JPEGs (one of 9 megapixels) with scans and markers repeated, dropped and moved, PNGs with chunks
    so rearranged, and /v2 JSON nested, repeated and cut: every body is sent once; sent = answered + unanswered,
    none unanswered, no 5xx, every error JSON, none slower than ANSWERED_WITHIN_S, no worker death."""

    picture = Image.new("RGB", (320, 240))
    ImageDraw.Draw(picture).ellipse((40, 30, 280, 210), fill=(200, 170, 120))
    seeds = {
        "jpeg": jpeg_segments(hostile.encoded(picture, "JPEG", progressive=True)),
        "jpeg-gray": jpeg_segments(hostile.encoded(picture.convert("L"), "JPEG", progressive=True)),
        "png": png_chunks(hostile.encoded(picture, "PNG")),
        # large enough that repeated scans pass the CPU budget (413), and repeated segments the body limit
        "jpeg-large": jpeg_segments(hostile.encoded(Image.new("L", (3000, 3000), 90), "JPEG", progressive=True)),
    }
    counts, slowest, lock = {"sent": 0, "answered": 0, "unanswered": 0, "5xx": 0, "non_json_errors": 0}, [0.0], \
        threading.Lock()
    statuses: dict[int, int] = {}
    jobs = iter(range(STRUCTURE_FUZZ_BODIES))
    before = deaths(stack)

    def run(thread: int) -> None:
        rng = random.Random(thread)
        while True:
            with lock:
                if next(jobs, None) is None:
                    return
                counts["sent"] += 1
            kind = rng.choice(["jpeg", "jpeg-gray", "jpeg-large", "png", "json"])
            if kind == "json":
                path, headers, body = V2_INFER, {"Content-Type": "application/json"}, json_mutant(rng)
            else:
                path, headers, body = "/infer", {"Content-Type": "image/*"}, rearranged(seeds[kind], rng)
            started = time.monotonic()
            try:
                answer = stack.request("POST", path, body, headers, timeout=60)
            except OSError:
                with lock:
                    counts["unanswered"] += 1
                continue
            elapsed = time.monotonic() - started
            json_error = answer.status < 400 or answer.headers.get("Content-Type", "").startswith("application/json")
            with lock:
                counts["answered"] += 1
                statuses[answer.status] = statuses.get(answer.status, 0) + 1
                counts["5xx"] += answer.status >= 500
                counts["non_json_errors"] += not json_error
                slowest[0] = max(slowest[0], elapsed)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(STRUCTURE_FUZZ_CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary = {**counts, "slowest_s": round(slowest[0], 2), "worker_deaths": deaths(stack) - before,
               **{f"status_{status}": count for status, count in sorted(statuses.items())}}
    for key, value in summary.items():
        record_property(key, value)
    print("\nstructure fuzz through nginx:", json.dumps(summary))
    assert counts["sent"] == STRUCTURE_FUZZ_BODIES == counts["answered"] + counts["unanswered"], summary
    assert counts["unanswered"] == 0 and counts["5xx"] == 0 and counts["non_json_errors"] == 0, summary
    assert slowest[0] < ANSWERED_WITHIN_S and summary["worker_deaths"] == 0, summary
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, summary  # both sides reached
