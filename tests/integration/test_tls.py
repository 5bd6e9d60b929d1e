"""HTTPS through the real stack (SEGAPP_TLS_CERT and SEGAPP_TLS_KEY, nginx/tls.conf) with a CA and a server
certificate made here: clients that verify the chain (curl, Python's ssl, tritonclient, the page in Chromium), HTTP/2
by ALPN, TLS 1.0 and 1.1 refused by the server, plain HTTP redirected, and a renewed certificate taken by a reload
under load (last: it leaves the stack with another certificate)."""

from __future__ import annotations

import base64
import datetime
import io
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from bench.stack import Endpoint
from tests.integration.conftest import start_stack
from tests.integration.test_reliability import RequestStream
from tests.integration.test_web import (
    CHROMEDRIVER,
    CHROMIUM,
    DESKTOP,
    FLAGS,
    console_errors,
    open_page,
    wait_segmented,
)

pytestmark = pytest.mark.integration

MODEL = "segapp-unet"
CURL = shutil.which("curl")


class TestCA:
    """A certificate authority of the test's own, and the server certificates it signs (for localhost and
    127.0.0.1), written as PEM files that the user uWSGI and nginx drop to can read."""

    __test__ = False  # not a test class

    def __init__(self, folder: Path):
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "segapp test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = self.write("ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    def write(self, name: str, data: bytes) -> Path:
        """Replace `name` at once (a reader sees the old file or the new one, never half of one)."""
        path = self.folder / name
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        partial.chmod(0o644)
        os.replace(partial, path)
        return path

    def issue(self, serial: int) -> tuple[bytes, bytes]:
        """A new key and a server certificate with `serial`, signed by this CA: (certificate PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def install(self, serial: int) -> tuple[Path, Path]:
        """Issue a certificate with `serial` into server.pem and server.key (the key first, as a renewal tool
        would, so that no reload could pair the new certificate with the old key)."""
        cert, key = self.issue(serial)
        key_path = self.write("server.key", key)
        return self.write("server.pem", cert), key_path

    def client_context(self) -> ssl.SSLContext:
        """Python's default client context (chain and host name verified) trusting only this CA."""
        return ssl.create_default_context(cafile=str(self.path))


@pytest.fixture(scope="module")
def ca():
    folder = Path(tempfile.mkdtemp(prefix="segapp-tls-"))
    folder.chmod(0o755)
    authority = TestCA(folder)
    authority.install(serial=1001)
    yield authority
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_stack(ca):
    """One HTTPS stack for the module; the renewal test, last, leaves it with a new certificate."""
    running = start_stack(tls=ca.client_context(), SEGAPP_TLS_CERT=str(ca.folder / "server.pem"),
                          SEGAPP_TLS_KEY=str(ca.folder / "server.key"))
    yield running
    running.stop()
    shutil.rmtree(running.run_dir, ignore_errors=True)


def handshake(port: int, context: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return context.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise


def served_serial(port: int, context: ssl.SSLContext) -> int:
    with handshake(port, context) as connection:
        return x509.load_der_x509_certificate(connection.getpeercert(binary_form=True)).serial_number


# --- rendering ------------------------------------------------------------------------------------------------

def test_render_needs_both_files_and_says_which_is_missing(render_nginx, run_dir, ca):
    for given, missing in (("SEGAPP_TLS_CERT", "SEGAPP_TLS_KEY"), ("SEGAPP_TLS_KEY", "SEGAPP_TLS_CERT")):
        path = ca.folder / ("server.pem" if given == "SEGAPP_TLS_CERT" else "server.key")
        with pytest.raises(subprocess.CalledProcessError) as failure:
            render_nginx(run_dir, 8443, **{given: str(path)})
        lines = failure.value.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{given} is set but {missing} is not" in lines[0], failure.value.stderr


def test_render_refuses_files_that_are_not_what_they_are_named(render_nginx, run_dir, ca):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        render_nginx(run_dir, 8443, SEGAPP_TLS_CERT=str(ca.folder / "server.key"),
                     SEGAPP_TLS_KEY=str(ca.folder / "server.key"))
    assert "SEGAPP_TLS_CERT" in failure.value.stderr and "certificate" in failure.value.stderr
    with pytest.raises(subprocess.CalledProcessError) as failure:
        render_nginx(run_dir, 8443, SEGAPP_TLS_CERT=str(ca.folder / "server.pem"),
                     SEGAPP_TLS_KEY=str(ca.folder / "missing.key"))
    assert "SEGAPP_TLS_KEY" in failure.value.stderr and "cannot read" in failure.value.stderr


def test_rendered_tls_config_passes_nginx_t_with_the_profile(render_nginx, nginx_binary, run_dir, ca):
    prefix = render_nginx(run_dir, 8443, SEGAPP_TLS_CERT=str(ca.folder / "server.pem"),
                          SEGAPP_TLS_KEY=str(ca.folder / "server.key"))
    checked = subprocess.run([nginx_binary, "-t", "-p", f"{prefix}/", "-c", "nginx.conf", "-e", "stderr"],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "listen 127.0.0.1:8443 ssl http2;" in (prefix / "segapp.conf").read_text()
    tls = (prefix / "tls.conf").read_text()
    for line in ("ssl_protocols TLSv1.2 TLSv1.3;", "ssl_session_timeout 1d;", "ssl_session_tickets off;",
                 "ssl_prefer_server_ciphers off;", "error_page 497 =308 https://$host:$server_port$request_uri;",
                 f'ssl_certificate "{ca.folder / "server.pem"}";'):
        assert line in tls
    # The test CA's certificate names no OCSP responder: nothing to staple.
    assert "ssl_stapling on;" not in tls and "no stapling" in tls


# --- clients over HTTPS ---------------------------------------------------------------------------------------

def test_curl_verifies_the_chain_and_speaks_http2(tls_stack, ca):
    if CURL is None:
        pytest.fail("curl is not installed")
    for host in ("127.0.0.1", "localhost"):
        done = subprocess.run([CURL, "-sS", "--cacert", str(ca.path), "--http2", "-o", "/dev/null",
                               "-w", "%{http_version} %{http_code}",
                               "--resolve", f"localhost:{tls_stack.port}:127.0.0.1",
                               f"https://{host}:{tls_stack.port}/readyz"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "2 200"
    # Without the test CA, curl refuses the certificate.
    refused = subprocess.run([CURL, "-sS", "--capath", "/nonexistent", "--cacert", "/dev/null", "-o", "/dev/null",
                              f"https://127.0.0.1:{tls_stack.port}/readyz"], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0


def test_python_verifies_the_chain_and_alpn_selects_h2(tls_stack, ca):
    context = ca.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with handshake(tls_stack.port, context, "localhost") as connection:
        assert connection.selected_alpn_protocol() == "h2"
        assert connection.version() in ("TLSv1.2", "TLSv1.3")
    # A client that trusts only the system's CAs refuses the test CA's certificate.
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls_stack.port, ssl.create_default_context()).close()


def test_inference_over_https_answers_the_mask(tls_stack, jpeg):
    answer = tls_stack.infer(jpeg)
    assert answer.status == 200, answer.body[:300]
    assert answer.headers["Content-Type"] == "image/png"
    mask = Image.open(io.BytesIO(answer.body))
    assert mask.size == Image.open(io.BytesIO(jpeg)).size


def test_triton_client_over_tls_gets_a_mask(tls_stack, ca, jpeg):
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    with triton.InferenceServerClient(f"localhost:{tls_stack.port}", ssl=True,
                                      ssl_context_factory=ca.client_context) as client:
        assert client.is_server_ready()
        image = triton.InferInput("image", list(pixels.shape), "UINT8")
        image.set_data_from_numpy(pixels)
        result = client.infer(MODEL, [image], outputs=[triton.InferRequestedOutput("mask")])
    mask = result.as_numpy("mask")
    assert mask.dtype == np.uint8 and mask.ndim == 2 and mask.size > 0


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["tls1.0", "tls1.1"])
def test_tls_1_0_and_1_1_are_refused_by_the_server(tls_stack, version):
    # OpenSSL's default security level would refuse these versions in the client itself; at level 0 the client
    # offers them, so the refusal can only come from nginx: its protocol_version alert.
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        # Python deprecates these versions; offering them is this test's point.
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = version
    with pytest.raises(ssl.SSLError) as refused:
        handshake(tls_stack.port, old).close()
    assert "PROTOCOL_VERSION" in str(refused.value).upper(), refused.value
    # The same client with TLS 1.2 allowed is served: the context itself was not the obstacle.
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with handshake(tls_stack.port, old) as connection:
        assert connection.version() == "TLSv1.2"


def test_plain_http_on_the_port_is_redirected_to_https_keeping_the_method(tls_stack, jpeg):
    plain = Endpoint(tls_stack.port)
    for method, body in (("GET", None), ("POST", jpeg)):
        answer = plain.request(method, "/infer?threshold=0.5", body=body, headers={"Content-Type": "image/jpeg"})
        assert answer.status == 308
        assert answer.headers["Location"] == f"https://127.0.0.1:{tls_stack.port}/infer?threshold=0.5"


def spki_hash(cert_path: Path) -> str:
    """Base64 of the SHA-256 of a certificate's public key (SubjectPublicKeyInfo), as Chromium's pin list takes it."""
    key = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_key()
    digest = hashes.Hash(hashes.SHA256())
    digest.update(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    return base64.b64encode(digest.finalize()).decode()


def test_the_page_in_chromium_over_https_segments_a_sample(tls_stack, ca):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.fail("chromium and chromedriver are not installed: run `make chromium`")
    profile = Path(tempfile.mkdtemp(prefix="segapp-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The test CA is trusted for this server's key only: Chromium accepts the certificate whose public key has this
    # hash (the flag is honoured only with a profile of the test's own, --user-data-dir), and no other.
    pin = f"--ignore-certificate-errors-spki-list={spki_hash(ca.folder / 'server.pem')}"
    for flag in (*FLAGS, f"--user-data-dir={profile}", pin):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        open_page(driver, tls_stack, DESKTOP)
        assert driver.execute_script("return location.protocol;") == "https:"
        assert driver.execute_script("return window.isSecureContext;") is True
        # The page came over HTTP/2 (ALPN), as did its script.
        protocols = driver.execute_script(
            "return [performance.getEntriesByType('navigation')[0].nextHopProtocol,"
            " ...performance.getEntriesByType('resource').map((entry) => entry.nextHopProtocol)];")
        assert set(protocols) == {"h2"}, protocols
        driver.find_element(By.CSS_SELECTOR, "[data-sample='samples/scene-2.jpg']").send_keys(Keys.ENTER)
        wait_segmented(driver, "scene-2.jpg")
        assert console_errors(driver) == []
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_renewed_certificate_is_taken_by_a_reload_under_load(tls_stack, ca, jpeg, record_property):
    context = ca.client_context()
    assert served_serial(tls_stack.port, context) == 1001
    nginx_pid = int((tls_stack.run_dir / "nginx" / "nginx.pid").read_text())
    with RequestStream(tls_stack, jpeg, clients=4) as stream:
        stream.wait_for(20)
        ca.install(serial=1002)
        # What docs/operations.md tells the operator: SIGHUP to nginx's master (`nginx -s reload` does the same).
        os.kill(nginx_pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while served_serial(tls_stack.port, context) != 1002:
            assert time.monotonic() < deadline, "nginx still serves the old certificate 30 s after the reload"
            time.sleep(0.1)
        stream.wait_for(20)
    answered = stream.outcomes.count("200")
    failed = len(stream.failures)
    print(f"\nrenewal under load: sent {stream.sent}, answered {answered}, failed {failed}")
    record_property("renewal_sent", stream.sent)
    record_property("renewal_failed", failed)
    assert stream.sent == answered + failed
    assert failed == 0, stream.failures[:5]
    # The same master: a reload, not a restart.
    assert int((tls_stack.run_dir / "nginx" / "nginx.pid").read_text()) == nginx_pid
