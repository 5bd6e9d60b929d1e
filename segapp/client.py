"""segapp-client: send images to a segapp server and save its answers.

    segapp-client photo.jpg more/*.png holiday/ --url http://127.0.0.1:8080 --format overlay -o out/
    segapp-client portraits/ --model person --format cutout

Each image's raw bytes are POSTed to URL/infer, several at once (--concurrency); a folder stands for the images in it.
The answer is written next to the input (or into OUT) as NAME.mask.png, NAME.mask.json, NAME.overlay.jpg or
NAME.cutout.png, from the server's default model or the one --model names. A 429 or
503 is asked again after the server's Retry-After, a lost connection or a 502 or 504 after a short back-off, up to
--retries times. Every failed image gets one line on stderr with its reason, in the order of the inputs; with several
images a summary line ends the run, and the exit status is 1 when any image failed. With a terminal, a progress bar
runs on stderr. With --api-key (or SEGAPP_API_KEY) every request carries `Authorization: Bearer KEY`; a 401 ends the
run at once with one line that says how to give a key, since every other image would be refused the same. The key
itself is never printed. Standard library only, so it runs from any Python 3.10+ without the server's dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import http.client
import json
import mimetypes
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8080"
SUFFIXES = {"png": ".mask.png", "json": ".mask.json", "overlay": ".overlay.jpg", "cutout": ".cutout.png"}
ACCEPT = {"png": "image/png", "json": "application/json", "overlay": "image/jpeg", "cutout": "image/png"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Statuses worth another try: rate limited (429), overloaded or draining (503), a worker lost or slow behind nginx
# (502, 504). Inference has no side effects, so asking again is safe. A 500 is the app failing on this image: the
# same image fails again.
RETRY_STATUSES = (429, 502, 503, 504)
# An API key goes into a header line: visible ASCII only, so that a stray space or line break is a usage error here
# rather than a refusal from http.client deep in a worker thread.
KEY_CHARACTERS = re.compile(r"[!-~]+")


@dataclass(frozen=True)
class Outcome:
    """What happened to one input: `error` is None on success, else a one-line reason; `retried` names what was
    met and asked again (a status such as "429", or "connection")."""

    source: Path
    target: Path | None
    error: str | None = None
    retried: tuple[str, ...] = ()
    unauthorized: bool = False
    """The server answered 401: no key, or not one it takes."""


@dataclass(frozen=True)
class Retrying:
    """How often to ask again (`retries` after the first try) and how long to wait between tries; once `stopped` is
    set (the run is over), never again."""

    retries: int = 5
    max_wait: float = 30.0
    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], float] = time.time
    stopped: threading.Event = field(default_factory=threading.Event)

    def delay(self, retry_after: str | None, attempt: int) -> float:
        """Seconds before try `attempt` + 1: the server's Retry-After (seconds or a date), else 0.5, 1, 2 ... s;
        never over `max_wait`."""
        seconds = retry_after_seconds(retry_after, self.now())
        if seconds is None:
            seconds = 0.5 * 2**attempt
        return min(seconds, self.max_wait)


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After header (delay-seconds or an HTTP-date) in seconds from `now`; None when absent or malformed."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now) if when.tzinfo else None


class Throttle:
    """At most `limit` requests in flight: --concurrency at first, and each 429 lowers it, for the rest of the run, to
    one under what was in flight when the server refused. A client asked for more at once than the server allows
    (nginx: 16 per address) so settles at or under what it allows, and a refused image waits here for a free slot
    instead of spending its retries on further 429s. A 503 leaves the limit alone: it says the whole server is busy
    or restarting, for a while, and its Retry-After already thins the load."""

    def __init__(self, ceiling: int):
        self.limit = ceiling
        self.in_flight = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the `limit` slots for one request."""
        with self._changed:
            self._changed.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self.in_flight -= 1
                self._changed.notify()

    def refused(self) -> None:
        """The server answered 429 to a request that still holds its slot."""
        with self._changed:
            self.limit = max(1, min(self.limit, self.in_flight) - 1)


def output_path(source: Path, fmt: str, out_dir: Path | None) -> Path:
    """Where the answer for `source` goes: beside it, or in `out_dir`, named after it."""
    name = source.name.rsplit(".", 1)[0] if "." in source.name else source.name
    return (out_dir or source.parent) / (name + SUFFIXES[fmt])


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Each path as given, a folder replaced by the images in it (by name, not recursive), leaving out the answers
    this client writes (NAME.mask.png ...) so that a second run does not segment the first one's masks."""
    images: list[Path] = []
    for path in paths:
        if not path.is_dir():
            images.append(path)
            continue
        images.extend(sorted(
            child for child in path.iterdir()
            if child.suffix.lower() in IMAGE_SUFFIXES and child.is_file()
            and not child.name.endswith(tuple(SUFFIXES.values()))
        ))
    return images


def segment_file(source: Path, target: Path, url: str, fmt: str, timeout: float, retrying: Retrying = Retrying(),
                 throttle: Throttle | None = None, model: str | None = None, api_key: str | None = None) -> Outcome:
    """POST `source` to `url`/infer (of `model`, default the server's), with `api_key` as its bearer token, and write
    the answer to `target`, asking again as `retrying` allows."""
    try:
        data = source.read_bytes()
    except OSError as error:
        return Outcome(source, None, f"cannot read: {error.strerror or error}")
    content_type = mimetypes.guess_type(source.name)[0]
    if not content_type or not content_type.startswith("image/"):
        content_type = "application/octet-stream"
    request = urllib.request.Request(
        f"{url.rstrip('/')}/infer?" + urllib.parse.urlencode({"format": fmt, **({"model": model} if model else {})}),
        data=data,
        method="POST",
        headers={"Content-Type": content_type, "Accept": ACCEPT[fmt], "User-Agent": "segapp-client"},
    )
    if api_key:
        # Not passed on to where a redirect points, which may be another host.
        request.add_unredirected_header("Authorization", f"Bearer {api_key}")
    throttle = throttle or Throttle(1)
    retried: list[str] = []
    for attempt in range(retrying.retries + 1):
        retry_after = None
        with throttle.slot():
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    body = response.read()
                break
            except urllib.error.HTTPError as error:
                if error.code not in RETRY_STATUSES:
                    return Outcome(source, None, _http_reason(error), tuple(retried), unauthorized=error.code == 401)
                if error.code == 429:
                    throttle.refused()
                reason, kind, retry_after = _http_reason(error), str(error.code), error.headers.get("Retry-After")
            except urllib.error.URLError as error:
                # Refused: nothing listens there, so no wait will help (curl's --retry does not retry it either).
                if isinstance(error.reason, ConnectionRefusedError):
                    return Outcome(source, None, f"cannot reach {url}: {error.reason}", tuple(retried))
                reason, kind = f"cannot reach {url}: {error.reason}", "connection"
            except (OSError, http.client.HTTPException) as error:  # reset, closed or timed out while answering
                reason, kind = f"connection to {url} lost: {error or type(error).__name__}", "connection"
        if attempt == retrying.retries or retrying.stopped.is_set():
            suffix = f" (after {attempt} retries)" if attempt else ""
            return Outcome(source, None, reason + suffix, tuple(retried))
        retried.append(kind)
        retrying.sleep(retrying.delay(retry_after, attempt))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    except OSError as error:
        return Outcome(source, None, f"cannot write {target}: {error.strerror or error}", tuple(retried))
    return Outcome(source, target, None, tuple(retried))


def _http_reason(error: urllib.error.HTTPError) -> str:
    """`413 body_too_large: message` from segapp's JSON error body, or the bare status when there is none."""
    try:
        detail = json.loads(error.read())["error"]
        return f"{error.code} {detail['code']}: {detail['message']}"
    except (ValueError, KeyError, TypeError, OSError):
        return f"{error.code} {error.reason}"


def unauthorized_line(outcome: Outcome, api_key: str | None) -> str:
    """The one line a 401 ends the run with: what the server said, and how to give it a key (never the key)."""
    advice = ("the server refused the API key: pass a valid one with --api-key KEY or SEGAPP_API_KEY" if api_key
              else "the server needs an API key: pass --api-key KEY or set SEGAPP_API_KEY")
    return f"segapp-client: {advice} ({outcome.error})"


def summary(outcomes: list[Outcome], seconds: float) -> str:
    """One line: `200 images, 200 answered, 0 failed, 23 retries (429: 23), 61.2 images/s in 3.3 s`."""
    answered = sum(outcome.error is None for outcome in outcomes)
    retried = Counter(kind for outcome in outcomes for kind in outcome.retried)
    retries = f"{sum(retried.values())} retries"
    if retried:
        retries += " (" + ", ".join(f"{kind}: {count}" for kind, count in sorted(retried.items())) + ")"
    rate = answered / seconds if seconds > 0 else 0.0
    return (f"{len(outcomes)} images, {answered} answered, {len(outcomes) - answered} failed, {retries}, "
            f"{rate:.1f} images/s in {seconds:.1f} s")


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


def parse_args(argv: list[str] | None, environ: Mapping[str, str] = os.environ) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="segapp-client",
        description="POST images to a segapp server and write its masks beside them (or into OUT).",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                        help="image files, or folders: each folder's images (not its subfolders)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    parser.add_argument("--format", choices=tuple(SUFFIXES), default="png",
                        help="png: the class mask; json: mask and class fractions; overlay: the image with the mask; "
                             "cutout: the image with its background transparent (RGBA PNG)")
    parser.add_argument("--model", help="the model to answer (GET /v1/models lists them; default: the server's)")
    parser.add_argument("--api-key", metavar="KEY", default=environ.get("SEGAPP_API_KEY"),
                        help="the API key a server with SEGAPP_API_KEYS_FILE asks for, sent as Authorization: Bearer "
                             "KEY (default: $SEGAPP_API_KEY; the environment keeps it out of the process list)")
    parser.add_argument("-o", "--out", type=Path, help="write answers into this folder instead of beside the inputs")
    parser.add_argument("-c", "--concurrency", "-j", "--jobs", dest="concurrency", type=int, default=4,
                        help="requests in flight at once, at most (default 4); fewer while the server answers 429")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one answer (default 60)")
    parser.add_argument("--retries", type=int, default=5,
                        help="asks again after 429, 502, 503, 504 or a lost connection, up to this many times "
                             "(default 5)")
    parser.add_argument("--max-wait", type=float, default=30.0,
                        help="longest wait before asking again, whatever Retry-After says (default 30 s)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.retries < 0 or args.timeout <= 0 or args.max_wait < 0:
        parser.error("--concurrency must be at least 1, --retries and --max-wait 0 or more, --timeout above 0")
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"--url {args.url}: expected http://HOST[:PORT] or https://...")
    args.api_key = (args.api_key or "").strip() or None  # an empty SEGAPP_API_KEY is none
    if args.api_key and not KEY_CHARACTERS.fullmatch(args.api_key):
        parser.error("--api-key (or SEGAPP_API_KEY): a key is printable ASCII with no spaces (sgk_...)")
    args.images = expand_inputs(args.images)
    if not args.images:
        parser.error("no images: the folders given hold none")
    return args


def main(argv: list[str] | None = None, sleep: Callable[[float], None] = time.sleep,
         environ: Mapping[str, str] = os.environ) -> int:
    """Segment every IMAGE; 0 when all succeeded, 1 when any failed or the server wants a key, 2 for a usage
    error."""
    args = parse_args(argv, environ)
    retrying = Retrying(args.retries, args.max_wait, sleep)
    throttle = Throttle(args.concurrency)
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
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        futures = [pool.submit(segment_file, s, t, args.url, args.format, args.timeout, retrying, throttle, args.model,
                               args.api_key) for s, t in jobs]
        for outcome in outcomes:
            progress.print(f"segapp-client: {outcome.source}: {outcome.error}")
            progress.advance(failed=True)
        for future in futures:  # in input order, so the lines and their order do not depend on timing
            outcome = future.result()
            if outcome.unauthorized:
                # Every other image would be refused the same: none more is sent, none in flight is asked again,
                # and one line says why.
                retrying.stopped.set()
                pool.shutdown(wait=False, cancel_futures=True)
                progress.clear()
                print(unauthorized_line(outcome, args.api_key), file=sys.stderr)
                return 1
            outcomes.append(outcome)
            if outcome.error:
                progress.print(f"segapp-client: {outcome.source}: {outcome.error}")
            progress.advance(failed=outcome.error is not None)
    progress.clear()
    if len(outcomes) > 1:
        print(f"segapp-client: {summary(outcomes, time.monotonic() - started)}", file=sys.stderr)
    return 1 if any(outcome.error for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
