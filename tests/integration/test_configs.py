"""Every config file is valid for the programs that read it: `nginx -t` on each nginx file, uWSGI in strict mode
on each ini file."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.stack import free_port

pytestmark = pytest.mark.integration


def nginx_test(nginx: str, prefix: Path, conf: str) -> subprocess.CompletedProcess:
    return subprocess.run([nginx, "-t", "-p", f"{prefix}/", "-c", conf, "-e", "stderr"],
                          capture_output=True, text=True, timeout=60)


def test_nginx_conf_as_local_ini_renders_it(nginx_binary, render_nginx, tmp_path):
    prefix = render_nginx(tmp_path, 8080)
    result = nginx_test(nginx_binary, prefix, "nginx.conf")
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    site = (prefix / "segapp.conf").read_text()
    assert "listen 127.0.0.1:8080;" in site and f"unix:{tmp_path}/app.sock" in site


def test_nginx_conf_with_the_test_settings(nginx_binary, render_nginx, tmp_path):
    prefix = render_nginx(tmp_path, 18080, SEGAPP_NGINX_RATE="2r/m", SEGAPP_NGINX_BURST="1",
                          SEGAPP_NGINX_READ_TIMEOUT="1s", SEGAPP_MAX_BODY_BYTES="1048576")
    result = nginx_test(nginx_binary, prefix, "nginx.conf")
    assert result.returncode == 0, result.stderr
    site = (prefix / "segapp.conf").read_text()
    for expected in ("rate=2r/m", "burst=1 ", "uwsgi_read_timeout 1s;", "client_max_body_size 1048576;"):
        assert expected in site


def test_nginx_render_refuses_a_malformed_setting(render_nginx, tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        render_nginx(tmp_path, 8080, SEGAPP_NGINX_RATE="fast")
    assert "SEGAPP_NGINX_RATE" in failure.value.stderr


def test_nginx_conf_with_json_logs(nginx_binary, render_nginx, tmp_path):
    prefix = render_nginx(tmp_path, 18080, SEGAPP_LOG_FORMAT="json")
    result = nginx_test(nginx_binary, prefix, "nginx.conf")
    assert result.returncode == 0, result.stderr
    assert "access_log access.log segapp_json;" in (prefix / "segapp.conf").read_text()
    with pytest.raises(subprocess.CalledProcessError) as failure:
        render_nginx(tmp_path, 8080, SEGAPP_LOG_FORMAT="xml")
    assert "SEGAPP_LOG_FORMAT" in failure.value.stderr


def test_nginx_site_file_in_a_debian_like_main_config(nginx_binary, repo_root, tmp_path):
    """segapp.conf as /etc/nginx/sites-enabled/segapp, inside an http {} like Debian's nginx.conf."""
    conf_dir = Path(subprocess.run([nginx_binary, "-V"], capture_output=True, text=True).stderr.split(
        "--conf-path=")[1].split()[0]).parent
    shutil.copyfile(conf_dir / "uwsgi_params", tmp_path / "uwsgi_params")
    site = (repo_root / "nginx" / "segapp.conf").read_text()
    if os.geteuid() != 0:  # only root may open Debian's log folder
        site = site.replace("/var/log/nginx/segapp.access.log", "access.log")
    (tmp_path / "segapp.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        "pid nginx.pid;\nerror_log stderr;\nevents {}\n"
        "http {\n    client_body_temp_path tmp; proxy_temp_path tmp; fastcgi_temp_path tmp;\n"
        "    uwsgi_temp_path tmp; scgi_temp_path tmp;\n    include segapp.conf;\n}\n"
    )
    result = nginx_test(nginx_binary, tmp_path, "nginx.conf")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("ini", ["segapp.ini", "local.ini"])
def test_uwsgi_strict_mode_accepts_the_ini(ini, repo_root, uwsgi_binary, run_dir, user_env):
    env = {
        **os.environ,
        "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin",
        "SEGAPP_RUN_DIR": str(run_dir),
        "SEGAPP_PORT": str(free_port()),
        "SEGAPP_PROCESSES": "1",
        **user_env,
    }
    log_path = run_dir / "uwsgi.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([uwsgi_binary, "--ini", str(repo_root / "uwsgi" / ini)], cwd=repo_root, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "spawned uWSGI worker 1" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "uWSGI did not start its worker in 120 s"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGINT)  # at once: the worker may still be loading the app
        process.wait(timeout=60)
    text = log_path.read_text(errors="replace")
    assert "[strict-mode]" not in text
    assert "strict = true" in (repo_root / "uwsgi" / "segapp.ini").read_text()


def test_uwsgi_strict_mode_rejects_an_unknown_option(repo_root, uwsgi_binary, tmp_path):
    """The copied-config trap: py-callos-afterfork is not an option; strict mode stops instead of ignoring it."""
    ini = tmp_path / "typo.ini"
    ini.write_text(f"[uwsgi]\nini = {repo_root / 'uwsgi' / 'segapp.ini'}\npy-callos-afterfork = true\n")
    result = subprocess.run([uwsgi_binary, "--ini", str(ini)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SEGAPP_RUN_DIR": str(tmp_path / "run")})
    assert result.returncode != 0
    assert "[strict-mode] unknown config directive: py-callos-afterfork" in result.stdout + result.stderr


def test_listen_backlog_within_somaxconn(repo_root):
    """uWSGI refuses to start with a listen queue above net.core.somaxconn."""
    listen = int(re.search(r"^listen = (\d+)$", (repo_root / "uwsgi" / "segapp.ini").read_text(), re.M).group(1))
    assert listen <= int(Path("/proc/sys/net/core/somaxconn").read_text())

