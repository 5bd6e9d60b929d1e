"""The image under the constraints deploy/kubernetes gives its pods, read from the rendered manifests and run by
Docker (no cluster runs here): read-only root, the run folder a tmpfs, the pod's user and group, every capability
dropped, no privilege escalation, the CPU and memory limits, the ConfigMap's settings. The probes, the container
port, the preStop hook and the grace period must work there as the manifests say."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath

import pytest

from bench.stack import free_port
from segapp.contract import read_card
from segapp.inference import SHIPPED_MODEL, card_path
from tests.integration.conftest import Endpoint
from tests.manifests import KUBERNETES, MODEL_VOLUME, ROOT, container, cpus, memory_bytes, one, render, settings

pytestmark = pytest.mark.integration

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# What the kubelet's HTTP probe sends besides the Host header.
PROBE_HEADERS = {"User-Agent": "kube-probe/1.37", "Accept": "*/*"}


class Pod:
    """The Deployment's container as `docker run` options, from the rendered objects of one kustomization."""

    def __init__(self, objects: list[dict]):
        self.spec = one(objects, "Deployment")["spec"]["template"]["spec"]
        self.container = container(objects)
        self.security = {**self.spec.get("securityContext", {}), **self.container.get("securityContext", {})}
        self.settings = settings(objects)
        self.port = self.container["ports"][0]["containerPort"]

    def docker_options(self, host_port: int, volumes: dict[str, Path] | None = None) -> list[str]:
        """`docker run` options for the pod's constraints; `volumes` gives a host folder for each volume that is
        not an emptyDir (a PersistentVolumeClaim), by name."""
        security = self.security
        user = security["runAsUser"]
        assert security["runAsNonRoot"] is True and user != 0, "the kubelet refuses to start it as root"
        options = ["--user", f"{user}:{security.get('runAsGroup', 0)}",
                   "--publish", f"127.0.0.1:{host_port}:{self.port}"]
        if security.get("readOnlyRootFilesystem"):
            options.append("--read-only")
        capabilities = security.get("capabilities", {})
        options += [f"--cap-drop={name}" for name in capabilities.get("drop", [])]
        options += [f"--cap-add={name}" for name in capabilities.get("add", [])]
        if security.get("allowPrivilegeEscalation") is False:
            options += ["--security-opt", "no-new-privileges"]
        # RuntimeDefault is the runtime's own seccomp profile: Docker applies its default unless told otherwise.
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
        limits = self.container["resources"]["limits"]
        options += ["--cpus", str(cpus(limits["cpu"])), "--memory", str(memory_bytes(limits["memory"]))]
        declared = {volume["name"]: volume for volume in self.spec.get("volumes", [])}
        for mount in self.container.get("volumeMounts", []):
            volume = declared[mount["name"]]
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("medium") == "Memory", "a disk-backed emptyDir is not modelled here"
                size = volume["emptyDir"].get("sizeLimit")
                options += ["--tmpfs", mount["mountPath"] + (f":size={memory_bytes(size)}" if size else "")]
            else:
                mode = "ro" if mount.get("readOnly") else "rw"
                options += ["--volume", f"{(volumes or {})[mount['name']]}:{mount['mountPath']}:{mode}"]
        for key, value in self.settings.items():
            options += ["--env", f"{key}={value}"]
        for variable in self.container.get("env", []):
            options += ["--env", f"{variable['name']}={variable['value']}"]
        return options

    def probe(self, endpoint: Endpoint, name: str):
        """One HTTP probe as the kubelet makes it: its path, its timeout."""
        probe = self.container[name]
        assert probe["httpGet"]["port"] in (self.port, self.container["ports"][0].get("name")), name
        return endpoint.request("GET", probe["httpGet"]["path"], headers=PROBE_HEADERS,
                                timeout=probe.get("timeoutSeconds", 1))


def start(docker, image: str, pod: Pod, volumes: dict[str, Path] | None = None) -> tuple[str, Endpoint]:
    """Run the pod's container; return once its startupProbe succeeds, failing if it does not within the probe's
    own budget (failureThreshold x periodSeconds after initialDelaySeconds)."""
    host_port = free_port()
    container_id = docker.run_container(image, *pod.docker_options(host_port, volumes))
    endpoint = Endpoint(host_port)
    startup = pod.container["startupProbe"]
    deadline = time.monotonic() + startup.get("initialDelaySeconds", 0) + (
        startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10))
    while True:
        try:
            if pod.probe(endpoint, "startupProbe").status == 200:
                return container_id, endpoint
        except OSError:
            pass
        state = docker.json("inspect", container_id)[0]["State"]
        if not state["Running"] or time.monotonic() > deadline:
            logs = docker("logs", container_id, check=False).stderr[-3000:]
            raise AssertionError(f"the startupProbe never succeeded: {state}\n{logs}")
        time.sleep(0.2)


def workers(docker, container_id: str, run_dir: str) -> int:
    """uWSGI's workers, from its stats socket inside the container."""
    read = ("import json, socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "print(len(json.loads(b''.join(iter(lambda: s.recv(65536), b'')))['workers']))")
    return int(docker("exec", container_id, "/opt/segapp/venv/bin/python", "-c", read, f"{run_dir}/stats.sock").stdout)


@pytest.fixture(scope="module")
def base_pod() -> Pod:
    return Pod(render(KUBERNETES))


@pytest.fixture(scope="module")
def running(docker, image, base_pod):
    """The base's pod, running for this module's tests."""
    container_id, endpoint = start(docker, image, base_pod)
    yield container_id, endpoint
    docker("rm", "--force", container_id, check=False)


def test_every_probe_succeeds_on_the_container_port(base_pod, running):
    _, endpoint = running
    for name in PROBES:
        answer = base_pod.probe(endpoint, name)
        assert answer.status == 200, (name, answer.status, answer.body[:300])
    assert base_pod.probe(endpoint, "readinessProbe").json()["status"] == "ready"


def test_every_process_runs_as_the_pods_user_and_group(docker, base_pod, running):
    container_id, _ = running
    # (docker top needs the pid column)
    table = docker("top", container_id, "-eo", "pid,uid,gid,args").stdout.splitlines()[1:]
    ids = {tuple(line.split()[1:3]) for line in table}
    assert ids == {(str(base_pod.security["runAsUser"]), str(base_pod.security["runAsGroup"]))}, table
    # uWSGI master, its workers and nginx, so the tree's users are all there was to check
    assert any("uwsgi" in line for line in table) and any("nginx: worker" in line for line in table), table


def test_workers_follow_the_cpu_limit(docker, base_pod, running):
    container_id, _ = running
    limit = cpus(base_pod.container["resources"]["limits"]["cpu"])
    assert workers(docker, container_id, base_pod.settings["SEGAPP_RUN_DIR"]) == limit


def test_an_inference_is_answered_under_the_pods_constraints(running):
    _, endpoint = running
    photo = (ROOT / "web" / "samples" / "scene-0.jpg").read_bytes()
    answer = endpoint.request("POST", "/infer?format=json", photo, {"Content-Type": "image/jpeg"})
    assert answer.status == 200, answer.body[:300]
    assert answer.json()["model"]["name"] == read_card(card_path(SHIPPED_MODEL))["name"]


def test_prestop_runs_then_sigterm_stops_everything_within_the_grace_period(docker, image, base_pod):
    """The kubelet runs preStop, then sends SIGTERM, then SIGKILL once terminationGracePeriodSeconds (counted from
    the start of preStop) has passed: the container must exit by itself before that."""
    container_id, _ = start(docker, image, base_pod)
    command = base_pod.container["lifecycle"]["preStop"]["exec"]["command"]
    started = time.monotonic()
    hook = docker("exec", container_id, *command, check=False, timeout=120)
    assert hook.returncode == 0, hook.stderr
    left = base_pod.spec["terminationGracePeriodSeconds"] - (time.monotonic() - started)
    docker("stop", "--time", str(int(left)), container_id, timeout=120)
    state = docker.json("inspect", container_id)[0]["State"]
    # 0: the stack stopped by itself; Docker's SIGKILL at the end of the period would have made it 137.
    assert (state["Running"], state["ExitCode"], state["OOMKilled"]) == (False, 0, False), state


def test_the_model_volume_overlay_serves_the_model_on_the_volume(docker, image):
    """overlays/model-volume: the claim's folder mounted read-only, SEGAPP_MODEL naming a model on it."""
    pod = Pod(render(MODEL_VOLUME))
    mount = next(item for item in pod.container["volumeMounts"]
                 if PurePosixPath(pod.settings["SEGAPP_MODEL"]).is_relative_to(item["mountPath"]))
    folder = Path(tempfile.mkdtemp(prefix="segapp-models-"))
    try:
        model = folder / PurePosixPath(pod.settings["SEGAPP_MODEL"]).relative_to(mount["mountPath"])
        model.parent.mkdir(parents=True)
        shutil.copyfile(SHIPPED_MODEL, model)
        # A version of its own, so the answer shows which model was loaded: the volume's, not the image's.
        card = {**read_card(card_path(SHIPPED_MODEL)), "release": "from-the-volume"}
        card_path(model).write_text(json.dumps(card))
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        _, endpoint = start(docker, image, pod, volumes={mount["name"]: folder})
        assert endpoint.request("GET", "/v1/model").json()["release"] == "from-the-volume"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
