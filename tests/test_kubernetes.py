"""deploy/kubernetes, offline: kubectl renders every kustomization, each object is valid for named Kubernetes
versions (their OpenAPI schemas, shipped by kubernetes-validate, strict: no unknown field passes), and the objects
fit each other, the image and uwsgi/segapp.ini. tests/integration/test_kubernetes_under_docker.py runs the image
as they say."""

from __future__ import annotations

import copy
import math
import re
from pathlib import PurePosixPath

import kubernetes_validate
import pytest

from segapp.contract import read_card
from segapp.inference import SHIPPED_MODEL, card_path
from tests.manifests import (
    KUSTOMIZATIONS,
    MODEL_VOLUME,
    ROOT,
    container,
    container_port,
    cpus,
    memory_bytes,
    one,
    render,
    settings,
)

# The oldest and the newest Kubernetes these manifests are checked against (autoscaling/v2 and policy/v1 need 1.23).
KUBERNETES_VERSIONS = ("1.30", "1.37")


@pytest.fixture(scope="module")
def rendered() -> dict:
    return {path: render(path) for path in KUSTOMIZATIONS}


@pytest.fixture(scope="module")
def base(rendered) -> list[dict]:
    return rendered[KUSTOMIZATIONS[0]]


def uwsgi_option(name: str) -> int:
    """A whole-number option of uwsgi/segapp.ini (its first, unconditional, setting)."""
    text = (ROOT / "uwsgi" / "segapp.ini").read_text()
    return int(re.search(rf"^{re.escape(name)}\s*=\s*(\d+)\s*$", text, re.MULTILINE).group(1))


def test_the_base_renders_each_object_once(base):
    assert sorted(item["kind"] for item in base) == [
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service",
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_object_is_valid_for_the_kubernetes_version(rendered, kustomization, version):
    for item in rendered[kustomization]:
        try:
            kubernetes_validate.validate(item, version, strict=True)
        except kubernetes_validate.utils.SchemaNotFoundError as missing:
            pytest.fail(missing.message)
        except kubernetes_validate.ValidationError as invalid:
            path = ".".join(str(step) for step in invalid.path)
            pytest.fail(f"{item['kind']}/{item['metadata']['name']} is not valid for {version}: {path}: "
                        f"{invalid.message}")


def test_the_validation_refuses_a_misspelt_field(base):
    """The check above can fail: a probe under a misspelt key is refused, not ignored as the API server would."""
    deployment = copy.deepcopy(one(base, "Deployment"))
    probed = deployment["spec"]["template"]["spec"]["containers"][0]
    probed["readynessProbe"] = probed.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_objects_select_the_pods_and_name_each_other(base):
    deployment = one(base, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": one(base, "Service")["spec"]["selector"],
        "PodDisruptionBudget": one(base, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector.items() <= pod_labels.items(), kind
    target = one(base, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # envFrom names the generated ConfigMap (with its hash), not a ConfigMap that is never made.
    assert settings(base)


def test_the_service_and_probes_reach_the_port_nginx_listens_on(base):
    served = container(base)
    port = int(settings(base)["SEGAPP_PORT"])
    assert [item["containerPort"] for item in served["ports"]] == [port]
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container_port(served, served[name]["httpGet"]["port"]) == port, name
    assert served["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert served["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for service_port in one(base, "Service")["spec"]["ports"]:
        assert container_port(served, service_port["targetPort"]) == port


def test_no_service_link_overrides_a_segapp_setting(base):
    """A Service named `segapp` would put SEGAPP_PORT=tcp://... and SEGAPP_SERVICE_HOST into every pod's
    environment, where the image takes SEGAPP_PORT for its own port."""
    pod = one(base, "Deployment")["spec"]["template"]["spec"]
    linked = [item["metadata"]["name"] for item in base if item["kind"] == "Service"
              and item["metadata"]["name"].upper().replace("-", "_").startswith("SEGAPP")]
    assert not linked or pod.get("enableServiceLinks") is False, linked


def test_the_image_is_the_one_make_image_tags(base):
    """`make image` tags segapp:<the shipped model's version>: a new model needs a new tag here."""
    assert container(base)["image"] == f"segapp:{read_card(card_path(SHIPPED_MODEL))['release']}"


def image_user() -> tuple[int, int]:
    """The Dockerfile's `USER uid:gid`, numeric (the user its useradd makes), as the image runs by default."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    (uid, gid), = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    assert re.search(rf"useradd .*--uid {uid} ", dockerfile), "USER names the uid that useradd creates"
    return int(uid), int(gid)


def test_the_pod_runs_unprivileged_on_a_read_only_root(base):
    pod = one(base, "Deployment")["spec"]["template"]["spec"]
    served = container(base)
    context = {**pod["securityContext"], **served["securityContext"]}
    assert context["runAsNonRoot"] is True
    # The image's own user and group, as its Dockerfile sets them (USER uid:gid), not a number copied here.
    uid, gid = image_user()
    assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add")
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    # The run folder, the only place the stack writes, is a memory-backed emptyDir.
    volumes = {item["name"]: item for item in pod["volumes"]}
    run_dir = settings(base)["SEGAPP_RUN_DIR"]
    mount = next(item for item in served["volumeMounts"] if item["mountPath"] == run_dir)
    assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"


def test_termination_outlasts_the_prestop_wait_the_drain_and_uwsgis_graceful_stop(base):
    pod = one(base, "Deployment")["spec"]["template"]["spec"]
    command = container(base)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:-1] == ["/bin/sleep"]
    # uWSGI waits up to worker-reload-mercy for the requests in flight, and harakiri ends any longer one.
    graceful_stop = max(uwsgi_option("worker-reload-mercy"), uwsgi_option("harakiri"))
    needed = float(command[-1]) + int(settings(base)["SEGAPP_DRAIN_SECONDS"]) + graceful_stop
    assert pod["terminationGracePeriodSeconds"] > needed


def test_resources_give_whole_workers_and_the_autoscaler_a_cpu_request(base):
    resources = container(base)["resources"]
    # Workers = the CPU limit rounded up (segapp/cpus.py); a fraction would leave a worker throttled.
    limit = cpus(resources["limits"]["cpu"])
    assert limit == math.ceil(limit) and cpus(resources["requests"]["cpu"]) == limit
    # Measured under these limits (deploy/kubernetes/README.md): the container's peak with both workers on 12 MP
    # photos (the request), on images of SEGAPP_MAX_PIXELS, with the run folder full (the limit).
    assert memory_bytes(resources["requests"]["memory"]) >= 266 * 2**20
    volumes = one(base, "Deployment")["spec"]["template"]["spec"]["volumes"]
    run_folder = sum(memory_bytes(item["emptyDir"]["sizeLimit"]) for item in volumes if "emptyDir" in item)
    # nginx holds request bodies in memory: at most 16 over 1 MB at once, of up to 10 MiB (nginx/segapp.conf).
    nginx_bodies = 16 * 10 * 2**20
    assert memory_bytes(resources["limits"]["memory"]) >= 814 * 2**20 + run_folder + nginx_bodies
    metrics = one(base, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [(item["type"], item["resource"]["name"]) for item in metrics] == [("Resource", "cpu")]
    budget = one(base, "PodDisruptionBudget")["spec"]
    assert one(base, "HorizontalPodAutoscaler")["spec"]["minReplicas"] > budget.get("maxUnavailable", 0)


def test_the_model_volume_overlay_mounts_the_model_it_names(rendered):
    objects = rendered[MODEL_VOLUME]
    served = container(objects)
    model = PurePosixPath(settings(objects)["SEGAPP_MODEL"])
    mount = next(item for item in served["volumeMounts"] if model.is_relative_to(item["mountPath"]))
    assert mount.get("readOnly") is True
    volume = next(item for item in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
                  if item["name"] == mount["name"])
    claims = [item["metadata"]["name"] for item in objects if item["kind"] == "PersistentVolumeClaim"]
    assert volume["persistentVolumeClaim"]["claimName"] in claims
    # Everything else is the base's.
    assert settings(objects)["SEGAPP_PORT"] == settings(rendered[KUSTOMIZATIONS[0]])["SEGAPP_PORT"]
