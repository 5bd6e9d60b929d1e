"""API keys (SEGAPP_API_KEYS_FILE): named keys, stored as SHA-256 digests, one per line; `segapp-keys` makes them.

    # name   key ID    SHA-256 of the whole key                                                 limits (optional)
    default                                                                                      rate=300r/s inflight=16
    alice    k3v9x2qa  sha256:9c56cc51b374c3ba189210d5b6d4bf57790d351c96c47c02190ecf1e430635ab  rate=20r/s inflight=4

A key reads `sgk_<key ID>_<secret>`: the ID (8 random characters) names the entry without the secret, so nginx can
count a request against its key's limits before the key is checked (nginx/render.py writes those limits from this
file); the secret (32 random bytes) is never stored, only the digest of the whole key. A key is checked by its
entry's digest with `hmac.compare_digest`; an unknown ID is compared with a digest of nothing, so that every check
costs the same. SHA-256 without salt or stretching suffices for 256 random bits (a password would need more).

`default` sets the limits of keys that name none; without it, DEFAULT_RATE and DEFAULT_INFLIGHT. Standard library
only: nginx/render.py imports this module before the virtual environment is known.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import re
import secrets
import string
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "sgk"
# A bearer token as a key must read; the ID and the secret as groups.
KEY = re.compile(rf"{PREFIX}_([a-z0-9]{{8}})_([A-Za-z0-9_-]{{43}})")
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +(\S+) *")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RATE = re.compile(r"([1-9][0-9]{0,5})r/([sm])")
_ID_ALPHABET = string.ascii_lowercase + string.digits
# Per key unless the file says otherwise: what one client address may do (nginx/segapp.conf), so that a key is
# limited like an address; a key shared by many addresses, or a small plan, gets its own line.
DEFAULT_RATE = "300r/s"
DEFAULT_INFLIGHT = 16
_NOTHING = hashlib.sha256(b"").digest()
HEADER = """\
# segapp API keys: one a line, written by segapp-keys (docs/operations.md, "API keys"). Never a key itself: its
# SHA-256. name, key ID, digest, then optional limits; the `default` line gives the limits of keys without their own.
"""


class KeyFileError(ValueError):
    """The keys file cannot be read or holds a line segapp does not take; the message names the file and line."""


@dataclass(frozen=True)
class Limits:
    rate: str = DEFAULT_RATE
    """Requests per second (`20r/s`) or minute (`60r/m`), with a burst of as many at once."""
    inflight: int = DEFAULT_INFLIGHT
    """Requests in flight at once, counted from their headers to the last byte of their answers."""

    @property
    def burst(self) -> int:
        return int(_RATE.fullmatch(self.rate).group(1))

    def describe(self) -> str:
        unit = "second" if self.rate.endswith("s") else "minute"
        return f"{self.burst} requests a {unit}, {self.inflight} at once"

    def fields(self) -> str:
        return f"rate={self.rate} inflight={self.inflight}"


@dataclass(frozen=True)
class Key:
    name: str
    key_id: str
    digest: bytes
    rate: str | None = None
    """Its own rate; None: the file's default."""
    inflight: int | None = None
    """Its own bound on requests at once; None: the file's default."""

    def line(self) -> str:
        own = "".join(f"  {field}={value}" for field, value in (("rate", self.rate), ("inflight", self.inflight))
                      if value)
        return f"{self.name}  {self.key_id}  sha256:{self.digest.hex()}{own}"


class KeyRing:
    """The keys of one file: check a request's Authorization header, and the limits nginx applies."""

    def __init__(self, keys: list[Key], default: Limits = Limits(), default_set: bool = False):
        self.keys = keys
        self.default = default
        self.default_set = default_set
        self.by_id = {key.key_id: key for key in keys}
        self.names = frozenset(key.name for key in keys)

    @classmethod
    def parse(cls, text: str, source: str = "the keys file") -> KeyRing:
        keys, default, default_set = [], Limits(), False
        names = set()
        for number, raw in enumerate(text.splitlines(), 1):
            words = raw.split("#", 1)[0].split()
            if not words:
                continue
            where = f"{source}, line {number}"
            if words[0] == "default":
                if default_set:
                    raise KeyFileError(f"{where}: a second `default` line")
                default, default_set = replace(Limits(), **_limits(words[1:], where)), True
                continue
            if len(words) < 3:
                raise KeyFileError(f"{where}: expected `NAME KEY_ID sha256:DIGEST [rate=N/s] [inflight=N]`")
            name, key_id, digest = words[:3]
            if not _NAME.fullmatch(name):
                raise KeyFileError(f"{where}: the name {name!r} is not 1-64 letters, digits, '.', '_' or '-'")
            if name in names:
                raise KeyFileError(f"{where}: the name {name!r} is used twice")
            if not re.fullmatch(r"[a-z0-9]{8}", key_id):
                raise KeyFileError(f"{where}: the key ID {key_id!r} is not 8 lower-case letters or digits")
            if key_id in (key.key_id for key in keys):
                raise KeyFileError(f"{where}: the key ID {key_id} is used twice")
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise KeyFileError(f"{where}: expected the key's digest as sha256: and 64 hex digits, never the key")
            names.add(name)
            keys.append(Key(name, key_id, bytes.fromhex(digest[7:]), **_limits(words[3:], where)))
        return cls(keys, default, default_set)

    @classmethod
    def read(cls, path: Path) -> KeyRing:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise KeyFileError(f"{path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
        return cls.parse(text, str(path))

    def check(self, authorization: str | None) -> Key | None:
        """The key that `authorization` ("Bearer <key>") presents, or None: missing, malformed or not a key here."""
        bearer = _BEARER.fullmatch(authorization or "")
        token = bearer.group(1) if bearer else ""
        match = KEY.fullmatch(token)
        key = self.by_id.get(match.group(1)) if match else None
        # The same work whatever was sent: a digest, and one comparison in constant time.
        same = hmac.compare_digest(hashlib.sha256(token.encode()).digest(), key.digest if key else _NOTHING)
        return key if key and same else None

    def limits(self, key: Key) -> Limits:
        return Limits(key.rate or self.default.rate, key.inflight or self.default.inflight)

    def text(self) -> str:
        default = [f"default  {self.default.fields()}"] if self.default_set else []
        return HEADER + "\n".join(default + [key.line() for key in self.keys]) + "\n"


def _limits(words: list[str], where: str) -> dict:
    """`rate=..`, `inflight=..` words as Key's or Limits' keyword arguments."""
    limits = {}
    for word in words:
        field, _, value = word.partition("=")
        if field == "rate" and _RATE.fullmatch(value):
            limits["rate"] = value
        elif field == "inflight" and value.isdigit() and 1 <= int(value) <= 65535:
            limits["inflight"] = int(value)
        else:
            raise KeyFileError(f"{where}: {word!r} is not rate=N/s, rate=N/m (N up to 999999) or inflight=N (1-65535)")
    return limits


class KeyFile:
    """SEGAPP_API_KEYS_FILE as the app reads it: read at start (a broken file stops the start), then again whenever
    it changes (its inode, size or modification time), so that a key added, removed or rotated counts from the next
    request, with no reload of the workers. A file that breaks later is logged and the keys before it stay."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.stamp = self._stamp()
        self.ring = KeyRing.read(self.path)

    def _stamp(self):
        try:
            found = os.stat(self.path)
        except OSError:
            return None
        return found.st_ino, found.st_size, found.st_mtime_ns

    def current(self) -> KeyRing:
        stamp = self._stamp()
        if stamp != self.stamp:
            self.stamp = stamp
            try:
                self.ring = KeyRing.read(self.path)
                log.info("API keys read again from %s: %d keys", self.path, len(self.ring.keys))
            except KeyFileError as error:
                log.error("API keys not changed, the file is not valid: %s", error)
        return self.ring


def new_key() -> tuple[str, str]:
    """(key ID, the whole key) of a new random key."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
    return key_id, f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _write(path: Path, ring: KeyRing) -> None:
    """Replace the file in one rename, readable by its owner and group only (never a partial file for a reader)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # run/keys before the first `make serve` made run/
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        out.write(ring.text())
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="segapp-keys",
        description="Add, rotate, remove and list the API keys of SEGAPP_API_KEYS_FILE. A new key is printed once, "
                    "on stdout; the file keeps its SHA-256 only. The running stack takes the change by itself.",
    )
    parser.add_argument("--file", type=Path, default=os.environ.get("SEGAPP_API_KEYS_FILE"),
                        help="the keys file (default: $SEGAPP_API_KEYS_FILE); made by the first `add`")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="a new named key; prints it")
    add.add_argument("name")
    rotate = commands.add_parser("rotate", help="a new key for NAME, its limits kept; the old one stops working")
    rotate.add_argument("name")
    remove = commands.add_parser("remove", help="revoke NAME's key")
    remove.add_argument("name")
    for command in (add, rotate):
        command.add_argument("--rate", help="its own request rate, e.g. 20r/s or 600r/m (default: the file's)")
        command.add_argument("--inflight", type=int, help="its own bound on requests at once (default: the file's)")
    commands.add_parser("list", help="the names, key IDs and limits")
    args = parser.parse_args(argv)
    if args.file is None:
        parser.error("no keys file: give --file or set SEGAPP_API_KEYS_FILE")
    try:
        ring = KeyRing.read(args.file) if args.file.exists() or args.command != "add" else KeyRing([])
        by_name = {key.name: key for key in ring.keys}
        if args.command == "list":
            for key in ring.keys:
                own = "" if key.rate or key.inflight else " (the default)"
                print(f"{key.name}\t{key.key_id}\t{ring.limits(key).fields()}{own}")
            return 0
        if args.command in ("rotate", "remove") and args.name not in by_name:
            raise KeyFileError(f"{args.file} has no key named {args.name!r}")
        if args.command == "add" and args.name in by_name:
            raise KeyFileError(f"{args.file} already has a key named {args.name!r}: rotate it, or choose another name")
        keys = [key for key in ring.keys if key.name != args.name]
        if args.command != "remove":
            old = by_name.get(args.name)
            limits = {"rate": old.rate, "inflight": old.inflight} if old else {}
            own = [f"rate={args.rate}"] * bool(args.rate) + [f"inflight={args.inflight}"] * bool(args.inflight)
            limits.update(_limits(own, "the command line"))
            key_id, key = new_key()
            entry = Key(args.name, key_id, digest(key), **limits)
            # A new key's line is checked as the server will read it, before the file is replaced.
            KeyRing.parse(entry.line())
            keys.append(entry)
        _write(args.file, KeyRing(keys, ring.default, ring.default_set))
    except KeyFileError as error:
        print(f"segapp-keys: {error}", file=sys.stderr)
        return 1
    if args.command != "remove":
        print(key)
    print(f"segapp-keys: {args.command} {args.name}: {args.file} written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
