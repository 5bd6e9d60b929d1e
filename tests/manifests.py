"""segapp's Kubernetes manifests (deploy/kubernetes) as kubectl renders them, and the parts the tests read."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
MODEL_VOLUME = KUBERNETES / "overlays" / "model-volume"
# Every kustomization a user may apply: the base (through deploy/kubernetes) and each overlay.
KUSTOMIZATIONS = (KUBERNETES, MODEL_VOLUME)


def kubectl() -> str:
    """The kubectl to render with: $KUBECTL, else the one on PATH (`make kubectl` installs Debian's)."""
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found:
        raise AssertionError("kubectl is not installed: run `make kubectl` (Debian's kubernetes-client)")
    return found


def render(kustomization: Path) -> list[dict]:
    """`kubectl kustomize` of a folder: its objects, in the order kubectl prints them."""
    done = subprocess.run([kubectl(), "kustomize", str(kustomization)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{done.stderr[-3000:]}"
    return [item for item in yaml.safe_load_all(done.stdout) if item]


def one(objects: list[dict], kind: str) -> dict:
    """The only object of `kind`."""
    found = [item for item in objects if item["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def container(objects: list[dict]) -> dict:
    """The Deployment's only container."""
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_port(container: dict, port: int | str) -> int:
    """A probe's or Service's port, a number or the name of one of the container's ports, as a number."""
    if isinstance(port, int):
        return port
    return next(item["containerPort"] for item in container["ports"] if item.get("name") == port)


def settings(objects: list[dict]) -> dict[str, str]:
    """The environment the container gets from the ConfigMaps it names (envFrom)."""
    names = [source["configMapRef"]["name"] for source in container(objects).get("envFrom", [])]
    maps = {item["metadata"]["name"]: item.get("data", {}) for item in objects if item["kind"] == "ConfigMap"}
    assert set(names) <= set(maps), f"envFrom names {names}; ConfigMaps rendered: {sorted(maps)}"
    return {key: value for name in names for key, value in maps[name].items()}


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (512Mi, 1G, 1500000) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?)?", quantity).groups()
    scale = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]
    return int(number) * scale


def cpus(quantity: str) -> float:
    """A Kubernetes CPU quantity (2, 1.5, 500m) in CPUs."""
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
