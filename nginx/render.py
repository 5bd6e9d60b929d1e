"""Write nginx's configuration for the local stack into RUN/nginx/: nginx.conf, segapp.conf and uwsgi_params.

nginx reads no environment variables, so uwsgi/local.ini runs this before it starts nginx. segapp.conf is the
production site file with these literals rewritten; each must appear exactly once, or this fails loudly rather
than start an nginx that listens or limits differently from what was asked:

    listen 80;  listen [::]:80;           -> listen ADDRESS:PORT; (SEGAPP_ADDRESS, default 127.0.0.1: loopback only)
    unix:/run/segapp/app.sock (3 times)   -> unix:RUN/app.sock
    /var/log/nginx/segapp.access.log      -> access.log under the prefix, or SEGAPP_NGINX_ACCESS_LOG (the image:
                                             /dev/stderr: 157 bytes a request would fill the run folder's tmpfs)
    access_log ... segapp;                -> ... segapp_json; when SEGAPP_LOG_FORMAT=json (the image)
    rate=300r/s, burst=300                <- SEGAPP_NGINX_RATE (e.g. 5r/s), SEGAPP_NGINX_BURST
    max_conns=32 (twice)                  <- SEGAPP_NGINX_MAX_INFLIGHT (requests at the workers, all clients), halved
    limit_conn segapp_per_client 16;      <- SEGAPP_NGINX_MAX_INFLIGHT_PER_CLIENT (requests in flight, one address)
    # set_real_ip_from: none              <- SEGAPP_NGINX_TRUSTED_PROXIES (addresses or CIDRs, space-separated)
    uwsgi_read_timeout 60s;               <- SEGAPP_NGINX_READ_TIMEOUT (e.g. 2s; keep it above harakiri)
    client_max_body_size 10m;             <- SEGAPP_MAX_BODY_BYTES, the app's own limit
    client_body_buffer_size 10m;          <- the same: every body is held in memory, none in the run folder
    root /srv/segapp/web;                 -> root REPO/web; (the try-it page of this checkout)
    # TLS: off                            <- SEGAPP_TLS_CERT and SEGAPP_TLS_KEY (PEM files, both or neither):
                                             include tls.conf; (nginx/tls.conf with their paths) and
                                             listen ADDRESS:PORT ssl http2;
    # key ...: none (the maps, zones,     <- SEGAPP_API_KEYS_FILE (segapp/keys.py): the key check and each key's
      limits and checks of API keys)         limits; uwsgi/local.ini runs this again when the file changes

`--site FILE` writes only segapp.conf with the API keys' lines, for Debian's nginx (docs/operations.md, "API keys").

Standard library only: it runs before the virtual environment is known. Usage:
    python3 nginx/render.py --run-dir RUN --port 8080
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import os
import pwd
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# segapp/keys.py reads the keys file; it needs only the standard library, so this runs before the venv is known. It is
# loaded from its file: in the image it lies beside this one (a segapp/ folder there would hide the installed package).
_KEYS_FILE = next(path for path in (HERE / "keys.py", HERE.parent / "segapp" / "keys.py") if path.exists())
_spec = importlib.util.spec_from_file_location("segapp_keys", _KEYS_FILE)
keys = sys.modules["segapp_keys"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(keys)

WEB_ROOT = HERE.parent / "web"
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
APP_SOCKET = "unix:/run/segapp/app.sock"
# Literals that occur more than once in segapp.conf; every other literal occurs exactly once.
OCCURRENCES = {APP_SOCKET: 3, "        # key check: none": 2}
# Requests that claim no key of the file, from one address: a few a second, after a first handful at once.
GUESS_RATE, GUESS_BURST = "2r/s", 10
# The DER of the OCSP access method's OID (1.3.6.1.5.5.7.48.1), which a certificate holds only in its Authority
# Information Access extension when it names an OCSP responder. (1.3.6.1.5.5.7.48.1.5, OCSP no-check, encodes
# with length 9, not 8.)
OCSP_ACCESS_METHOD = bytes.fromhex("06082b06010505073001")


class TLSFiles:
    """SEGAPP_TLS_CERT and SEGAPP_TLS_KEY, checked: both set or neither, each a readable PEM file."""

    def __init__(self, cert: Path, key: Path):
        self.cert, self.key = cert, key

    @classmethod
    def from_environ(cls, environ) -> TLSFiles | None:
        cert, key = environ.get("SEGAPP_TLS_CERT", ""), environ.get("SEGAPP_TLS_KEY", "")
        if not cert and not key:
            return None
        if not cert or not key:
            given, missing = ("SEGAPP_TLS_CERT", "SEGAPP_TLS_KEY") if cert else ("SEGAPP_TLS_KEY", "SEGAPP_TLS_CERT")
            raise RenderError(f"{given} is set but {missing} is not: HTTPS needs both, the certificate and its key")
        return cls(_pem_path(cert, "SEGAPP_TLS_CERT", "CERTIFICATE"), _pem_path(key, "SEGAPP_TLS_KEY", "PRIVATE KEY"))

    def has_ocsp_responder(self) -> bool:
        """Whether the (first) certificate names an OCSP responder, which nginx can then staple."""
        der = ssl.PEM_cert_to_DER_cert(self.cert.read_text())
        return OCSP_ACCESS_METHOD in der

    def render(self, text: str) -> str:
        """nginx/tls.conf with these files, and stapling on when the certificate allows it."""
        subs = {
            "ssl_certificate /etc/segapp/tls/fullchain.pem;": f'ssl_certificate "{self.cert}";',
            "ssl_certificate_key /etc/segapp/tls/key.pem;": f'ssl_certificate_key "{self.key}";',
            "# ssl_stapling: none": "ssl_stapling on;\n    ssl_stapling_verify on;" if self.has_ocsp_responder()
            else "# (no stapling: the certificate names no OCSP responder)",
        }
        return render_site(text, subs, "tls.conf")


def key_substitutions(environ) -> dict[str, str]:
    """The API keys' lines of segapp.conf from SEGAPP_API_KEYS_FILE (none when it is unset)."""
    path = environ.get("SEGAPP_API_KEYS_FILE")
    if not path:
        return {}
    try:
        ring = keys.KeyRing.read(Path(path))
    except keys.KeyFileError as error:
        raise RenderError(f"SEGAPP_API_KEYS_FILE: {error}") from None
    limits = {key.name: ring.limits(key) for key in ring.keys}
    rates = sorted({limit.rate for limit in limits.values()} | {ring.default.rate})
    bounds = sorted({limit.inflight for limit in limits.values()} | {ring.default.inflight})
    zones, location = [], [f"limit_req zone=segapp_key_guesses burst={GUESS_BURST} nodelay;"]
    for kind, values, of in (("rate", rates, "rate"), ("inflight", bounds, "inflight")):
        for index, value in enumerate(values):
            variable = f"segapp_key_{kind}_{index}"
            names = "".join(f"    {name} {name};\n" for name, limit in limits.items() if getattr(limit, of) == value)
            zones.append(f"map $segapp_key_name ${variable} {{\n    default \"\";\n{names}}}")
            if kind == "rate":
                zones.append(f"limit_req_zone ${variable} zone={variable}:1m rate={value};")
                location.append(f"limit_req zone={variable} burst={keys.Limits(rate=value).burst} nodelay;")
            else:
                zones.append(f"limit_conn_zone ${variable} zone={variable}:1m;")
                location.append(f"limit_conn {variable} {value};")
    zones.append(f"limit_req_zone $segapp_key_guess zone=segapp_key_guesses:10m rate={GUESS_RATE};")
    check = f"limit_req zone=segapp_key_guesses burst={GUESS_BURST} nodelay;\n        auth_request /.segapp/key;"
    guess = "too many requests without a valid API key from your address; retry later"
    return {
        "    # key IDs: none": f'    "~^[Bb][Ee][Aa][Rr][Ee][Rr] +{keys.PREFIX}_([a-z0-9]{{8}})_" $1;',
        "    # key names: none": "\n".join(f"    {key.key_id} {key.name};" for key in ring.keys) or "    # (no keys)",
        "    # key guesses: none": '    "" $binary_remote_addr;',
        "    # key limit texts: none": "\n".join(
            f'    {name} "; the key {name} allows {limit.describe()}";' for name, limit in limits.items()
        ) or "    # (no keys)",
        "# key zones: none": "\n".join(zones),
        "        # key limits: none": "\n        ".join(location + ["auth_request /.segapp/key;"]),
        "        # key check: none": "        " + check,
        "            # key check, nested: none": "            " + check.replace("\n        ", "\n            "),
        "            # key guess 429: none": _if_guess(json.dumps(
            {"error": {"code": "rate_limited", "message": guess, "request_id": "$segapp_request_id"}})),
        "            # key guess 429 v2: none": _if_guess(json.dumps({"error": guess})),
    }


def _if_guess(body: str) -> str:
    """The 429 page's answer to a request that claims no key of the file (the guesses' zone refused it)."""
    return "            if ($segapp_key_guess) {\n                return 429 '" + body + "\\n';\n            }"


class RenderError(ValueError):
    """A setting is malformed, or segapp.conf no longer holds a literal this script rewrites."""


def site_substitutions(run_dir: Path, port: int, environ) -> dict[str, str]:
    """The literal -> replacement pairs for segapp.conf."""
    subs = {
        "listen 80;": f"listen {_address(environ.get('SEGAPP_ADDRESS') or '127.0.0.1')}:{port};",
        "listen [::]:80;": "# (IPv6 listen dropped: one address, SEGAPP_ADDRESS)",
        APP_SOCKET: f"unix:{run_dir / 'app.sock'}",
        "access_log /var/log/nginx/segapp.access.log segapp;":
            f"access_log {_log_path(environ.get('SEGAPP_NGINX_ACCESS_LOG') or 'access.log')} "
            f"{_log_format(environ.get('SEGAPP_LOG_FORMAT') or 'text')};",
        "root /srv/segapp/web;": f'root "{WEB_ROOT}";',
    }
    if TLSFiles.from_environ(environ):
        subs["listen 80;"] = subs["listen 80;"][:-1] + " ssl http2;"
        subs["# TLS: off"] = "include tls.conf;"
    rate = environ.get("SEGAPP_NGINX_RATE")
    if rate:
        if not re.fullmatch(r"\d+r/[sm]", rate):
            raise RenderError(f"SEGAPP_NGINX_RATE={rate!r}: expected requests per second or minute, e.g. 20r/s")
        subs["rate=300r/s"] = f"rate={rate}"
    burst = environ.get("SEGAPP_NGINX_BURST")
    if burst:
        subs["burst=300"] = f"burst={_whole(burst, 'SEGAPP_NGINX_BURST')}"
    inflight = environ.get("SEGAPP_NGINX_MAX_INFLIGHT")
    if inflight:
        bound = _whole(inflight, "SEGAPP_NGINX_MAX_INFLIGHT")
        if bound < 2:
            raise RenderError(f"SEGAPP_NGINX_MAX_INFLIGHT={inflight}: at least 2 (the socket's two entries share it)")
        subs["max_conns=32 max_fails=0;"] = f"max_conns={bound - bound // 2} max_fails=0;"
        subs["max_fails=0 max_conns=32;"] = f"max_fails=0 max_conns={bound // 2};"
    per_client = environ.get("SEGAPP_NGINX_MAX_INFLIGHT_PER_CLIENT")
    if per_client:
        limit = _whole(per_client, "SEGAPP_NGINX_MAX_INFLIGHT_PER_CLIENT")
        if limit > 65535:
            raise RenderError(f"SEGAPP_NGINX_MAX_INFLIGHT_PER_CLIENT={per_client}: nginx takes at most 65535")
        subs["limit_conn segapp_per_client 16;"] = f"limit_conn segapp_per_client {limit};"
    proxies = environ.get("SEGAPP_NGINX_TRUSTED_PROXIES", "").split()
    if proxies:
        subs["# set_real_ip_from: none"] = "\n    ".join(f"set_real_ip_from {_network(p)};" for p in proxies)
    timeout = environ.get("SEGAPP_NGINX_READ_TIMEOUT")
    if timeout:
        if not re.fullmatch(r"\d+(ms|s|m)?", timeout):
            raise RenderError(f"SEGAPP_NGINX_READ_TIMEOUT={timeout!r}: expected a duration such as 2s or 500ms")
        subs["uwsgi_read_timeout 60s;"] = f"uwsgi_read_timeout {timeout};"
    body = environ.get("SEGAPP_MAX_BODY_BYTES")
    if body:
        limit = _whole(body.replace("_", ""), "SEGAPP_MAX_BODY_BYTES")
        subs["client_max_body_size 10m;"] = f"client_max_body_size {limit};"
        subs["client_body_buffer_size 10m;"] = f"client_body_buffer_size {limit};"
    return subs


def render_site(text: str, subs: dict[str, str], name: str = "segapp.conf") -> str:
    """`text` with every literal of `subs` replaced; each must occur exactly once (or as OCCURRENCES says)."""
    for literal, replacement in subs.items():
        found, expected = text.count(literal), OCCURRENCES.get(literal, 1)
        if found != expected:
            raise RenderError(
                f"{name} holds {literal!r} {found} times, expected {expected}; update nginx/render.py"
            )
        text = text.replace(literal, replacement)
    return text


def nginx_conf_dir() -> Path:
    """The folder of the installed nginx's own configuration (where its uwsgi_params lives)."""
    nginx = find_nginx()
    if nginx:
        built = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
        match = re.search(r"--conf-path=(\S+)", built)
        if match:
            return Path(match.group(1)).parent
    return Path("/etc/nginx")


def find_nginx() -> str | None:
    """The nginx executable on PATH or in the sbin folders, which are not on a plain user's PATH."""
    return shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def render(run_dir: Path, port: int, user: str | None = None, environ=os.environ) -> Path:
    """Write RUN/nginx/{nginx.conf, segapp.conf, uwsgi_params} and its temp folder; returns RUN/nginx.

    `user` ("user group") is nginx's worker user when nginx's master runs as root: uWSGI's user, so that nginx's
    workers can open the 660 socket (left alone, root's nginx workers run as nobody and every request is a 502).
    """
    out = run_dir / "nginx"
    (out / "tmp").mkdir(parents=True, exist_ok=True)
    site = render_site((HERE / "segapp.conf").read_text(), site_substitutions(run_dir, port, environ))
    # After the others: the keys' lines hold literals (a rate, a burst) that those rewrite.
    site = render_site(site, key_substitutions(environ))
    (out / "segapp.conf").write_text(site)
    tls = TLSFiles.from_environ(environ)
    (out / "tls.conf").unlink(missing_ok=True)
    if tls:
        (out / "tls.conf").write_text(tls.render((HERE / "tls.conf").read_text()))
    main_conf = (HERE / "nginx.conf").read_text()
    if user:
        main_conf = f"# written by nginx/render.py: nginx starts as root here\nuser {user};\n" + main_conf
    (out / "nginx.conf").write_text(main_conf)
    params = nginx_conf_dir() / "uwsgi_params"
    if not params.exists():
        raise RenderError(f"{params} is missing: is nginx installed? (make nginx)")
    shutil.copyfile(params, out / "uwsgi_params")
    return out


def _uid(user: str) -> int:
    return int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid


def _address(raw: str) -> str:
    try:
        return str(ipaddress.IPv4Address(raw))
    except ValueError:
        raise RenderError(f"SEGAPP_ADDRESS={raw!r}: expected an IPv4 address, e.g. 127.0.0.1 or 0.0.0.0") from None


def _network(raw: str) -> str:
    try:
        return str(ipaddress.ip_network(raw, strict=False))
    except ValueError:
        raise RenderError(
            f"SEGAPP_NGINX_TRUSTED_PROXIES: {raw!r} is not an address or a network such as 10.0.0.0/8"
        ) from None


def _log_path(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._/-]+", raw):
        raise RenderError(f"SEGAPP_NGINX_ACCESS_LOG={raw!r}: expected a file path such as access.log or /dev/stderr")
    return raw


def _log_format(raw: str) -> str:
    formats = {"text": "segapp", "json": "segapp_json"}
    if raw not in formats:
        raise RenderError(f"SEGAPP_LOG_FORMAT={raw!r}: expected text or json")
    return formats[raw]


def _pem_path(raw: str, name: str, kind: str) -> Path:
    path = Path(raw).resolve()
    if '"' in str(path) or not re.fullmatch(r"[^\s;{}$]+", str(path)):
        raise RenderError(f"{name}={raw!r}: expected a file path without spaces, quotes, ';', '{{', '}}' or '$'")
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        raise RenderError(f"{name}={raw!r}: cannot read it ({error.strerror})") from None
    if not re.search(rf"-----BEGIN [A-Z ]*{kind}-----", text):
        raise RenderError(f"{name}={raw!r}: not a PEM file with a {kind.lower()} (-----BEGIN ...{kind}-----)")
    return path


def _whole(raw: str, name: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise RenderError(f"{name}={raw!r}: expected a whole number of at least 1")
    return int(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="the run folder (socket, pid, temp files)")
    parser.add_argument("--port", type=int, default=8080, help="the loopback port nginx listens on")
    parser.add_argument("--user", nargs=2, metavar=("USER", "GROUP"), help="nginx's worker user when started as root")
    parser.add_argument("--site", type=Path, help="write only segapp.conf with the API keys' lines here, and stop")
    args = parser.parse_args(argv)
    if args.site:
        try:
            args.site.write_text(render_site((HERE / "segapp.conf").read_text(), key_substitutions(os.environ)))
        except (RenderError, OSError) as error:
            print(f"nginx/render.py: {error}", file=sys.stderr)
            return 1
        print(f"nginx/render.py: wrote {args.site}", file=sys.stderr)
        return 0
    if args.run_dir is None:
        parser.error("--run-dir is required (or --site)")
    # uWSGI spawns nginx after it drops to its uid: nginx's master is root only when that uid is root too.
    user = " ".join(args.user) if args.user and os.geteuid() == 0 and _uid(args.user[0]) == 0 else None
    try:
        out = render(args.run_dir.resolve(), args.port, user)
    except (RenderError, OSError) as error:
        print(f"nginx/render.py: {error}", file=sys.stderr)
        return 1
    scheme = "https" if (out / "tls.conf").exists() else "http"
    print(f"nginx/render.py: wrote {out}/nginx.conf for {scheme} on port {args.port}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
