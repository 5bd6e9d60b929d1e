"""segapp-client: send images to a segapp server and save its answers.

    segapp-client photo.jpg more/*.png --url http://127.0.0.1:8080 --format overlay -o out/

Each file's raw bytes are POSTed to URL/infer; the answer is written next to the input (or into OUT) as
NAME.mask.png, NAME.mask.json or NAME.overlay.jpg. Every failed file gets one line on stderr with its reason, and
the exit status is 1 when any file failed. With several files and a terminal, a progress bar runs on stderr.
Standard library only, so it runs from any Python 3.10+ without the server's dependencies.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8080"
SUFFIXES = {"png": ".mask.png", "json": ".mask.json", "overlay": ".overlay.jpg"}
ACCEPT = {"png": "image/png", "json": "application/json", "overlay": "image/jpeg"}
# Statuses worth another try: rate limited, overloaded or restarting. Anything else is the answer.
RETRY_STATUSES = (429, 502, 503)


@dataclass(frozen=True)
class Outcome:
    """What happened to one input: `error` is None on success, else a one-line reason."""

    source: Path
    target: Path | None
    error: str | None = None


def output_path(source: Path, fmt: str, out_dir: Path | None) -> Path:
    """Where the answer for `source` goes: beside it, or in `out_dir`, named after it."""
    name = source.name.rsplit(".", 1)[0] if "." in source.name else source.name
    return (out_dir or source.parent) / (name + SUFFIXES[fmt])


def segment_file(source: Path, target: Path, url: str, fmt: str, timeout: float, retries: int,
                 sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """POST `source` to `url`/infer and write the answer to `target`."""
    try:
        data = source.read_bytes()
    except OSError as error:
        return Outcome(source, None, f"cannot read: {error.strerror or error}")
    content_type = mimetypes.guess_type(source.name)[0]
    if not content_type or not content_type.startswith("image/"):
        content_type = "application/octet-stream"
    request = urllib.request.Request(
        f"{url.rstrip('/')}/infer?format={fmt}",
        data=data,
        method="POST",
        headers={"Content-Type": content_type, "Accept": ACCEPT[fmt], "User-Agent": "segapp-client"},
    )
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
            break
        except urllib.error.HTTPError as error:
            if error.code in RETRY_STATUSES and attempt < retries:
                sleep(_retry_delay(error.headers.get("Retry-After"), attempt))
                continue
            return Outcome(source, None, _http_reason(error))
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            return Outcome(source, None, f"cannot reach {url}: {reason}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    except OSError as error:
        return Outcome(source, None, f"cannot write {target}: {error.strerror or error}")
    return Outcome(source, target)


def _retry_delay(retry_after: str | None, attempt: int) -> float:
    if retry_after and retry_after.isdigit():
        return min(float(retry_after), 30.0)
    return 0.5 * 2**attempt


def _http_reason(error: urllib.error.HTTPError) -> str:
    """`413 body_too_large: message` from segapp's JSON error body, or the bare status when there is none."""
    try:
        detail = json.loads(error.read())["error"]
        return f"{error.code} {detail['code']}: {detail['message']}"
    except (ValueError, KeyError, TypeError, OSError):
        return f"{error.code} {error.reason}"


class Progress:
    """A one-line progress bar on a terminal; silent when the stream is not one or there is a single file."""

    def __init__(self, total: int, stream, width: int = 30):
        self.total, self.stream, self.width = total, stream, width
        self.done = self.failed = 0
        self.enabled = total > 1 and stream.isatty()

    def advance(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if self.enabled:
            filled = self.width * self.done // self.total
            bar = "#" * filled + "." * (self.width - filled)
            failures = f", {self.failed} failed" if self.failed else ""
            self.stream.write(f"\r[{bar}] {self.done}/{self.total}{failures}")
            self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (self.width + 40) + "\r")
            self.stream.flush()

    def print(self, line: str) -> None:
        """Print a line above the bar."""
        self.clear()
        print(line, file=self.stream)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="segapp-client",
        description="POST images to a segapp server and write its masks beside them (or into OUT).",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files to segment")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    parser.add_argument("--format", choices=tuple(SUFFIXES), default="png",
                        help="png: the class mask; json: mask and class fractions; overlay: the image with the mask")
    parser.add_argument("-o", "--out", type=Path, help="write answers into this folder instead of beside the inputs")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="requests in flight at once (default 2)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one answer (default 60)")
    parser.add_argument("--retries", type=int, default=2,
                        help="tries again after 429, 502 or 503, backing off (default 2)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.retries < 0 or args.timeout <= 0:
        parser.error("--jobs must be at least 1, --retries 0 or more, --timeout above 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Segment every IMAGE; 0 when all succeeded, 1 when any failed, 2 for a usage error."""
    args = parse_args(argv)
    targets = [output_path(source, args.format, args.out) for source in args.images]
    progress = Progress(len(args.images), sys.stderr)
    outcomes: list[Outcome] = []
    seen: set[Path] = set()
    jobs = []
    for source, target in zip(args.images, targets, strict=True):
        if target in seen:  # two inputs with one name would overwrite each other's answer in OUT
            outcomes.append(Outcome(source, None, f"another input also writes {target}"))
            continue
        seen.add(target)
        jobs.append((source, target))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(segment_file, s, t, args.url, args.format, args.timeout, args.retries) for s, t in jobs]
        for outcome in outcomes:
            progress.print(f"segapp-client: {outcome.source}: {outcome.error}")
            progress.advance(failed=True)
        for future in futures:
            outcome = future.result()
            outcomes.append(outcome)
            if outcome.error:
                progress.print(f"segapp-client: {outcome.source}: {outcome.error}")
            progress.advance(failed=outcome.error is not None)
    progress.clear()
    failed = [o for o in outcomes if o.error]
    if len(args.images) > 1:
        print(f"segapp-client: {len(outcomes) - len(failed)} of {len(outcomes)} images segmented", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
