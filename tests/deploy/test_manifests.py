"""The deploy/ manifests: every kustomize overlay, Envoy and the Dockerfile agree with the code.

Each overlay is rendered with kustomize (the kubectl that `make setup` puts in .venv/bin,
or one on PATH) and the objects that `kubectl apply -k` would send are checked.
"""

import functools
import importlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from services.common.context import ADMIN_SCOPE, parse_principal
from services.common.interceptors import SERVICE_SCOPE
from services.common.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ENVOY = DEPLOY / "envoy"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
OVERLAYS = ("dev", "gpu", "external-data")
# The overlays for GPU clusters: llm on an NVIDIA node, the CPU services scaled out.
GPU_OVERLAYS = ("gpu", "external-data")
PORTS = {"ingest": 50051, "embed": 50052, "llm": 50053, "sessions": 50054, "telemetry": 50055}
DATABASES = {"postgres": 5432, "qdrant": 6333}
# Every pod reads one Secret of its own (secret.example.yaml); envoy reads none.
OWN_SECRET = {
    **{name: f"ragmesh-{name}-secrets" for name in PORTS},
    "postgres": "ragmesh-postgres-secrets",
    "qdrant": "ragmesh-qdrant-secrets",
}
# The one entry each StatefulSet reads from its Secret.
STORE_KEY = {"postgres": "POSTGRES_PASSWORD", "qdrant": "QDRANT__SERVICE__API_KEY"}
# A user's calls reach these services (sessions forwards them to ingest and llm), so each
# accepts every user key.
USER_FACING = ("ingest", "llm", "sessions", "telemetry")
# These call embed with their own RAGMESH_<SERVICE>_EMBED_API_KEY.
EMBED_CALLERS = ("ingest", "sessions")
# The services that scale out on a GPU cluster (an HPA and a PDB each).
SCALED = ("ingest", "embed", "sessions")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
GPU = "nvidia.com/gpu"
GPU_LABEL = "nvidia.com/gpu.present"
# Settings whose values are credentials: they live in Secrets, never in the ConfigMap.
SECRET_FIELD = re.compile(r"(^|_)(api_keys?|jwt_key|database_url|password)$", re.I)


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def full_service_name(name: str) -> str:
    """ragmesh.<name>.v1.<Service>, read from the service's .proto file."""
    text = (ROOT / "protos" / "ragmesh" / name / "v1" / f"{name}.proto").read_text()
    package = re.search(r"^package\s+([\w.]+);", text, re.M).group(1)
    service = re.search(r"^service\s+(\w+)\s*{", text, re.M).group(1)
    return f"{package}.{service}"


def kustomize_command() -> list[str]:
    """kubectl kustomize (make setup installs kubectl into .venv/bin), or kustomize build."""
    for kubectl in (Path(sys.executable).parent / "kubectl", shutil.which("kubectl")):
        if kubectl and Path(kubectl).is_file():
            return [str(kubectl), "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    message = "neither kubectl nor kustomize is installed (make setup installs kubectl)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@functools.cache
def render(directory: Path) -> tuple[dict, ...]:
    result = subprocess.run(
        [*kustomize_command(), str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@dataclass
class Rendered:
    """One overlay as `kubectl apply -k` sends it."""

    name: str
    docs: tuple[dict, ...]

    def get(self, kind: str, name: str) -> dict | None:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) <= 1, (kind, name)
        return found[0] if found else None

    def __getitem__(self, key: tuple[str, str]) -> dict:
        doc = self.get(*key)
        assert doc is not None, f"{self.name} has no {key}"
        return doc

    def of_kind(self, kind: str) -> dict[str, dict]:
        return {d["metadata"]["name"]: d for d in self.docs if d["kind"] == kind}

    @property
    def workloads(self) -> dict[str, dict]:
        return {d["metadata"]["name"]: d for d in self.docs if d["kind"] in WORKLOAD_KINDS}

    @property
    def config(self) -> dict[str, str]:
        return self[("ConfigMap", "ragmesh-config")]["data"]

    @property
    def databases_inside(self) -> bool:
        return self.get("StatefulSet", "postgres") is not None


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> Rendered:
    return Rendered(request.param, render(K8S / "overlays" / request.param))


@pytest.fixture(scope="module", params=GPU_OVERLAYS)
def gpu_overlay(request) -> Rendered:
    return Rendered(request.param, render(K8S / "overlays" / request.param))


@pytest.fixture(scope="module")
def dev() -> Rendered:
    return Rendered("dev", render(K8S / "overlays" / "dev"))


@pytest.fixture(scope="module")
def secrets() -> dict[str, dict[str, str]]:
    """The Secrets of secret.example.yaml, by name: their stringData."""
    docs = load_all(SECRET_EXAMPLE)
    assert all(doc["kind"] == "Secret" for doc in docs)
    found = {doc["metadata"]["name"]: doc["stringData"] for doc in docs}
    assert len(found) == len(docs), "a Secret is defined twice"
    assert set(found) == set(OWN_SECRET.values())
    return found


def own_secret(secrets: dict[str, dict[str, str]], name: str) -> dict[str, str]:
    return secrets[OWN_SECRET[name]]


def api_keys(secrets: dict[str, dict[str, str]], name: str) -> dict[str, str]:
    return json.loads(own_secret(secrets, name)[f"RAGMESH_{name.upper()}_API_KEYS"])


def user_keys(secrets: dict[str, dict[str, str]], name: str) -> dict[str, str]:
    """A service's API keys less its peer key (the key telemetry pods send each other)."""
    keys = api_keys(secrets, name)
    own = own_secret(secrets, name).get(f"RAGMESH_{name.upper()}_PEER_API_KEY")
    return {key: principal for key, principal in keys.items() if key != own}


def settings_class_of(name: str) -> type[ServiceSettings]:
    module = importlib.import_module(f"services.{name}.settings")
    (settings_class,) = (
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, ServiceSettings)
        and value is not ServiceSettings
    )
    return settings_class


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def container(workload: dict) -> dict:
    (only,) = pod_spec(workload)["containers"]
    return only


def all_containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def secret_refs(workload: dict) -> dict[str, set[str] | None]:
    """Secret name -> the entries a pod template reads from it (None: all of them)."""
    spec = pod_spec(workload)
    refs: dict[str, set[str] | None] = {}

    def add(name: str, key: str | None = None) -> None:
        if key is None:
            refs[name] = None
        elif refs.get(name, set()) is not None:
            refs.setdefault(name, set()).add(key)

    for each in all_containers(workload):
        for source in each.get("envFrom", []):
            if "secretRef" in source:
                add(source["secretRef"]["name"])
        for variable in each.get("env", []):
            if ref := variable.get("valueFrom", {}).get("secretKeyRef"):
                add(ref["name"], ref["key"])
    for volume in spec.get("volumes", []):
        for source in [volume, *volume.get("projected", {}).get("sources", [])]:
            if "secret" in source:
                add(source["secret"].get("secretName") or source["secret"]["name"])
    return refs


def secret_values(workload: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """Every Secret entry the pod sees, by name."""
    seen = {}
    for name, keys in secret_refs(workload).items():
        data = secrets[name]
        seen.update(data if keys is None else {key: data[key] for key in keys})
    return seen


def expected_workloads(overlay: Rendered) -> set[str]:
    return {*PORTS, "envoy", *(DATABASES if overlay.databases_inside else ())}


# -- Layout --------------------------------------------------------------------------


def kustomizations() -> list[Path]:
    return sorted(path.parent for path in DEPLOY.rglob("kustomization.yaml"))


def test_every_yaml_parses_and_every_manifest_is_used():
    files = sorted(DEPLOY.rglob("*.y*ml"))
    assert files
    for path in files:
        assert load_all(path), path
    for directory in kustomizations():
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        listed = set()
        for key in ("resources", "components", "patches", "configMapGenerator"):
            for item in kustomization.get(key, []):
                if isinstance(item, str):
                    listed.add((directory / item).resolve())
                elif "path" in item:
                    listed.add((directory / item["path"]).resolve())
                else:
                    listed |= {(directory / entry).resolve() for entry in item.get("files", [])}
        for entry in listed:
            assert entry.exists(), entry
        unused = {
            path.resolve() for path in directory.glob("*.yaml") if path.name != "kustomization.yaml"
        } - listed
        assert not unused, f"not in {directory}/kustomization.yaml: {unused}"
    # Outside the kustomizations only the example Secrets, applied on their own.
    assert sorted(p.name for p in K8S.glob("*.yaml")) == [SECRET_EXAMPLE.name]


def test_every_service_in_protos_is_deployed():
    services = {path.name for path in (ROOT / "protos" / "ragmesh").iterdir() if path.is_dir()}
    assert services == set(PORTS)


def test_overlays_build_into_the_namespace_without_secrets(overlay):
    assert set(overlay.workloads) == expected_workloads(overlay)
    # The Secrets are applied on their own, never with defaults from the repository.
    assert not overlay.of_kind("Secret")
    for doc in overlay.docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "ragmesh", doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ragmesh"


def test_manifests_match_the_kubernetes_schemas(overlay):
    validate = pytest.importorskip("kubernetes_validate")
    for doc in [*overlay.docs, *load_all(SECRET_EXAMPLE)]:
        validate.validate(doc, "1.30.0", strict=True)


# -- Services: ports, probes, shutdown, images ----------------------------------------


@pytest.mark.parametrize("name", PORTS)
def test_service_and_workload_agree_on_the_port(overlay, name):
    port = PORTS[name]
    service, workload = overlay[("Service", name)], overlay.workloads[name]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, "grpc")]
    assert [(p["name"], p["containerPort"]) for p in container(workload)["ports"]] == [
        ("grpc", port)
    ]
    labels = pod_labels(workload)
    assert service["spec"]["selector"].items() <= labels.items()
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Headless: DNS lists every ready pod, so Envoy and clients balance per pod.
    assert service["spec"]["clusterIP"] == "None"
    assert overlay.config[f"RAGMESH_{name.upper()}_PORT"] == str(port)


@pytest.mark.parametrize("name", PORTS)
def test_probes_are_grpc_on_the_service_port(overlay, name):
    probed = container(overlay.workloads[name])
    assert "readinessProbe" in probed and "livenessProbe" in probed
    # Readiness asks the server's overall health; startup and liveness the "liveness"
    # name, which stays SERVING while a model loads.
    assert probed["readinessProbe"]["grpc"] == {"port": PORTS[name]}
    for kind in ("startupProbe", "livenessProbe"):
        if kind in probed:
            assert probed[kind]["grpc"] == {"port": PORTS[name], "service": "liveness"}, kind


@pytest.mark.parametrize("name", PORTS)
def test_termination_grace_exceeds_the_drain(overlay, name):
    workload = overlay.workloads[name]
    grace = float(overlay.config[f"RAGMESH_{name.upper()}_SHUTDOWN_GRACE_SECONDS"])
    pre_stop = container(workload)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod_spec(workload)["terminationGracePeriodSeconds"] > grace + float(pre_stop[1])


def test_images_are_tagged_and_llm_is_cuda_only_on_gpu_clusters(overlay):
    llm = "llm-cuda" if overlay.name in GPU_OVERLAYS else "llm"
    for name in PORTS:
        image = container(overlay.workloads[name])["image"]
        assert image == f"ragmesh/{llm if name == 'llm' else name}:0.1.0", name


def test_no_pod_gets_kubernetes_service_variables(overlay):
    """Service links would put <SERVICE>_PORT=tcp://... for every Service in every pod:
    under a name prefix such as "ragmesh-", RAGMESH_LLM_PORT (a bad port) and
    RAGMESH_LLM_SERVICE_HOST (no setting), each of which stops the service at start."""
    for name, workload in overlay.workloads.items():
        assert pod_spec(workload)["enableServiceLinks"] is False, name


def test_every_container_runs_unprivileged_on_a_read_only_root(overlay):
    for name, workload in overlay.workloads.items():
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is False, name
        assert not any(spec.get(key) for key in ("hostNetwork", "hostPID", "hostIPC")), name
        for each in all_containers(workload):
            context = {**spec.get("securityContext", {}), **each["securityContext"]}
            assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert context["readOnlyRootFilesystem"] is True, name
            assert not context.get("privileged"), name


@pytest.mark.parametrize("name", PORTS)
def test_where_a_service_writes_is_a_volume(overlay, name):
    """A read-only root: /tmp, and DATA_DIR where the service keeps files, are volumes."""
    workload = overlay.workloads[name]
    mounts = {m["mountPath"]: m for m in container(workload)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    if name in ("ingest", "llm", "sessions"):
        data = mounts[overlay.config[f"RAGMESH_{name.upper()}_DATA_DIR"]]
        assert not data.get("readOnly")
        volume = volumes[data["name"]]
        if name == "sessions":
            # Its sessions, messages and memory are in PostgreSQL and Qdrant.
            assert "emptyDir" in volume and overlay.config["RAGMESH_SESSIONS_QDRANT_URL"]
        else:
            claim = volume["persistentVolumeClaim"]["claimName"]
            assert overlay.get("PersistentVolumeClaim", claim) is not None


# -- Credentials ------------------------------------------------------------------------


@pytest.mark.parametrize("name", PORTS)
def test_every_service_listens_on_the_pod_network_with_credentials(overlay, secrets, name):
    """Beyond loopback without API keys a service refuses to start."""
    assert overlay.config[f"RAGMESH_{name.upper()}_HOST"] == "0.0.0.0"
    assert container(overlay.workloads[name])["envFrom"] == [
        {"configMapRef": {"name": "ragmesh-config"}},
        {"secretRef": {"name": OWN_SECRET[name]}},
    ]
    keys = api_keys(secrets, name)
    assert keys and all(isinstance(value, str) for value in keys.values())
    for principal in keys.values():
        assert parse_principal(principal).tenant  # a key without a tenant stops the service


def test_every_pod_refers_only_to_its_own_secret(overlay):
    for name, workload in overlay.workloads.items():
        refs = secret_refs(workload)
        if name == "envoy":
            assert refs == {}, name
        elif name in STORE_KEY:
            assert refs == {OWN_SECRET[name]: {STORE_KEY[name]}}, name
        else:
            assert refs == {OWN_SECRET[name]: None}, name


def test_secrets_are_referenced_never_inlined(overlay):
    for name, workload in overlay.workloads.items():
        for each in all_containers(workload):
            for variable in each.get("env", []):
                assert "value" not in variable or not SECRET_FIELD.search(variable["name"]), (
                    name,
                    variable["name"],
                )
    for key in overlay.config:
        assert not SECRET_FIELD.search(key), key


def test_the_example_documents_every_key():
    """Every entry of every example Secret has a comment right above it saying what it is."""
    lines = SECRET_EXAMPLE.read_text().splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^  [A-Z][A-Z0-9_]*:", line)]
    assert len(keys) == sum(len(doc["stringData"]) for doc in load_all(SECRET_EXAMPLE))
    for index in keys:
        assert lines[index - 1].lstrip().startswith("#"), lines[index]


def test_each_secret_holds_only_its_own_services_values(secrets):
    for name, secret in OWN_SECRET.items():
        if name in STORE_KEY:
            assert set(secrets[secret]) == {STORE_KEY[name]}, secret
        else:
            prefix = f"RAGMESH_{name.upper()}_"
            assert all(key.startswith(prefix) for key in secrets[secret]), secret


def test_the_example_secrets_hold_only_placeholders(secrets):
    """Nothing usable is committed, and each Secret lands in the namespace of its pods."""
    for name, data in secrets.items():
        for key, value in data.items():
            assert "replace-with-" in value, (name, key)
    for doc in load_all(SECRET_EXAMPLE):
        assert doc["metadata"]["namespace"] == "ragmesh"
        assert doc["type"] == "Opaque"


def test_no_credential_reaches_a_pod_that_does_not_need_it(overlay, secrets):
    postgres, qdrant = (own_secret(secrets, name)[key] for name, key in STORE_KEY.items())
    stores = set(STORE_KEY) if overlay.databases_inside else set()
    needs = {
        postgres: {"ingest", "sessions"} | stores & {"postgres"},
        qdrant: {"ingest", "sessions"} | stores & {"qdrant"},
        **{key: set(USER_FACING) for key in api_keys(secrets, "ingest")},
        own_secret(secrets, "telemetry")["RAGMESH_TELEMETRY_PEER_API_KEY"]: {"telemetry"},
    }
    for caller in EMBED_CALLERS:
        needs[own_secret(secrets, caller)[f"RAGMESH_{caller.upper()}_EMBED_API_KEY"]] = {
            caller,
            "embed",
        }
    seen = {name: secret_values(w, secrets) for name, w in overlay.workloads.items()}
    text = {name: "\n".join(values.values()) for name, values in seen.items()}
    for credential, pods in needs.items():
        holders = {name for name in seen if credential in text[name]}
        assert holders == pods, credential
        # Every pod takes the whole ConfigMap.
        assert credential not in "\n".join(overlay.config.values())
    # For example: llm's pod sees neither the database nor Qdrant, embed no user key.
    assert not any("DATABASE_URL" in key or "QDRANT" in key for key in seen["llm"])
    assert set(api_keys(secrets, "embed")).isdisjoint(api_keys(secrets, "ingest"))


def test_user_keys_are_the_same_wherever_a_users_call_reaches(secrets):
    """The same keys and principals in ingest, llm, sessions and telemetry; admin only in llm."""
    keys = {name: user_keys(secrets, name) for name in USER_FACING}
    for name in USER_FACING:
        assert set(keys[name]) == set(keys["ingest"]), name
        for key, value in keys[name].items():
            principal, first = parse_principal(value), parse_principal(keys["ingest"][key])
            assert (principal.subject, principal.tenant) == (first.subject, first.tenant), name
    # LoadModel, UnloadModel and UpdateGenerationConfig need admin: the operator's key has
    # it in llm, ordinary user keys have no scope.
    scopes = [parse_principal(value).scopes for value in keys["llm"].values()]
    assert frozenset({ADMIN_SCOPE}) in scopes and frozenset() in scopes


def test_services_that_call_embed_send_a_key_embed_accepts(overlay, secrets):
    """ingest's background indexing calls embed with ingest's own key (sessions' likewise)."""
    accepted = api_keys(secrets, "embed")
    sent = {}
    for caller in EMBED_CALLERS:
        prefix = f"RAGMESH_{caller.upper()}_"
        assert overlay.config[prefix + "EMBED_TARGET"] == f"embed:{PORTS['embed']}"
        sent[caller] = own_secret(secrets, caller)[prefix + "EMBED_API_KEY"]
        principal = parse_principal(accepted[sent[caller]])
        assert principal.subject == caller and principal.tenant
        # A service's own key: out of the per-caller limit, and never admin.
        assert principal.scopes == {SERVICE_SCOPE}
    # Each caller has a key of its own, and embed holds only theirs.
    assert len(set(sent.values())) == len(sent)
    assert set(accepted) == set(sent.values())


def test_telemetry_pods_send_their_peers_a_key_they_accept(secrets):
    """Each telemetry pod asks the others for their node's snapshot with its own key."""
    telemetry = own_secret(secrets, "telemetry")
    sent = telemetry["RAGMESH_TELEMETRY_PEER_API_KEY"]
    principal = parse_principal(api_keys(secrets, "telemetry")[sent])
    assert principal.subject == "telemetry" and principal.tenant
    assert principal.scopes == {SERVICE_SCOPE}
    assert sent not in api_keys(secrets, "ingest")


# -- Settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", PORTS)
def test_setting_names_exist_in_the_settings_class(overlay, secrets, name):
    """Each RAGMESH_<SERVICE>_* name in the ConfigMap and its Secret is a setting it reads
    (an unknown one would stop the service at start)."""
    environ = {**overlay.config, **own_secret(secrets, name)}
    assert settings_class_of(name).unknown_variables(environ) == []


@pytest.mark.parametrize("name", PORTS)
def test_every_upstream_the_code_names_is_configured(overlay, name):
    """A *_target field left at its localhost default would call the pod itself."""
    fields = settings_class_of(name).model_fields
    prefix = f"RAGMESH_{name.upper()}_"
    for field in fields:
        if field.endswith("_target") or field in ("mesh_targets", "peers"):
            assert prefix + field.upper() in overlay.config, field


@pytest.mark.parametrize("name", PORTS)
def test_each_service_starts_with_its_pods_environment(monkeypatch, overlay, secrets, name):
    """The ConfigMap and the service's own Secret validate, credentials included."""
    settings_class = settings_class_of(name)
    for key in [key for key in os.environ if key.startswith("RAGMESH_")]:
        monkeypatch.delenv(key)
    for key, value in {**overlay.config, **own_secret(secrets, name)}.items():
        monkeypatch.setenv(key, value)
    settings = settings_class()
    settings.check_exposure()
    assert settings.auth_configured and not settings.auth_disabled


# -- GPUs ---------------------------------------------------------------------------------


def gpu_limit(workload: dict) -> int | None:
    return container(workload)["resources"].get("limits", {}).get(GPU)


def lands_on_gpu_nodes(workload: dict) -> bool:
    spec = pod_spec(workload)
    tolerated = any(
        t["key"] == GPU and t["operator"] == "Exists" and t["effect"] == "NoSchedule"
        for t in spec.get("tolerations", [])
    )
    return spec.get("nodeSelector", {}).get(GPU_LABEL) == "true" and tolerated


def test_dev_asks_for_no_gpu(dev):
    for name, workload in dev.workloads.items():
        for each in all_containers(workload):
            resources = each.get("resources", {})
            assert GPU not in {**resources.get("requests", {}), **resources.get("limits", {})}
        assert GPU_LABEL not in pod_spec(workload).get("nodeSelector", {}), name
    # llm runs the packaged GGUF on llama.cpp, on the CPU image.
    assert dev.config.get("RAGMESH_LLM_DEFAULT_MODEL", "SmolLM2-135M-Instruct") == (
        settings_class_of("llm").model_fields["default_model"].default
    )


def test_dev_runs_one_replica_each_with_small_requests(dev):
    assert not dev.of_kind("HorizontalPodAutoscaler")
    for name, workload in dev.workloads.items():
        if workload["kind"] != "DaemonSet":
            assert workload["spec"].get("replicas", 1) == 1, name
        requests = container(workload)["resources"]["requests"]
        assert cpu_cores(requests["cpu"]) <= 0.5 and memory_bytes(requests["memory"]) <= 2**30


def test_the_gpu_overlays_put_llm_alone_on_a_gpu_node(gpu_overlay):
    llm = gpu_overlay.workloads["llm"]
    assert gpu_limit(llm) == 1 and lands_on_gpu_nodes(llm)
    for name, workload in gpu_overlay.workloads.items():
        if name not in ("llm", "telemetry"):
            assert gpu_limit(workload) is None and not lands_on_gpu_nodes(workload), name
    # One GPU and a ReadWriteOnce volume: the old pod goes before the new one starts.
    assert llm["spec"]["strategy"]["type"] == "Recreate"
    # Long enough for CUDA's start and a multi-GB model on a network volume.
    startup = container(llm)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60


def test_the_embed_gpu_component_moves_embed_onto_a_gpu(tmp_path, monkeypatch, secrets):
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)],
                "components": [os.path.relpath(K8S / "components" / "embed-gpu", tmp_path)],
            }
        )
    )
    rendered = Rendered("gpu+embed-gpu", render(tmp_path))
    embed = rendered.workloads["embed"]
    assert gpu_limit(embed) == 1 and lands_on_gpu_nodes(embed)
    assert container(embed)["image"] == "ragmesh/embed-cuda:0.1.0"
    assert rendered[("HorizontalPodAutoscaler", "embed")]["spec"]["minReplicas"] >= 2
    for key in [key for key in os.environ if key.startswith("RAGMESH_")]:
        monkeypatch.delenv(key)
    for key, value in {**rendered.config, **own_secret(secrets, "embed")}.items():
        monkeypatch.setenv(key, value)
    settings = settings_class_of("embed")()
    assert settings.device == "cuda" and settings.backend in ("auto", "torch")


# -- Telemetry on every node --------------------------------------------------------------


def test_telemetry_runs_on_every_node_and_reads_the_host_read_only(overlay):
    telemetry = overlay.workloads["telemetry"]
    assert telemetry["kind"] == "DaemonSet"
    spec = pod_spec(telemetry)
    # GPU nodes and other tainted pools included.
    assert {"operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths
    mounted = {}
    for each in all_containers(telemetry):
        for mount in each.get("volumeMounts", []):
            if mount["name"] in host_paths:
                assert mount["readOnly"] is True, mount
                assert mount.get("mountPropagation", "None") == "None", mount
                mounted[mount["mountPath"]] = host_paths[mount["name"]]
    assert set(mounted.values()) == set(host_paths.values())
    # The disks reported are those of the node's own folders, as mounted.
    for directory in json.loads(overlay.config["RAGMESH_TELEMETRY_DATA_DIRECTORIES"]):
        assert any(Path(directory).is_relative_to(path) for path in mounted), directory
    env = {v["name"]: v.get("value") for v in container(telemetry).get("env", [])}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    assert gpu_limit(telemetry) is None  # sees the GPUs without taking one from llm
    # Each pod probes itself; the other services by their Services.
    mesh = json.loads(overlay.config["RAGMESH_TELEMETRY_MESH_TARGETS"])
    assert set(mesh) == set(PORTS)
    assert mesh["telemetry"] == f"localhost:{PORTS['telemetry']}"
    for name, target in mesh.items():
        assert target.endswith(f":{PORTS[name]}"), name
    # Each pod names its node and asks every other telemetry pod, ready or not, for its
    # node's snapshot: the mesh view lists every node.
    (node_name,) = [v for v in container(telemetry)["env"] if v["name"] == "NODE_NAME"]
    assert node_name["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    (peers,) = json.loads(overlay.config["RAGMESH_TELEMETRY_PEERS"])
    host, port = peers.split(":")
    service = overlay[("Service", host)]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"].items() <= pod_labels(telemetry).items()
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(int(port), "grpc")]


# -- Scaling and disruptions ---------------------------------------------------------------


def cpu_cores(value: str | int) -> float:
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(value[: -len(suffix)]) * factor
    return int(value)


# What ingest needs besides its parse children: 172 MiB resident at peak in
# bench.ingest_bench (docs/decisions.md), with room for uploads and parsed text in flight.
INGEST_SERVICE_BYTES = 512 * 2**20


def test_ingest_memory_limit_holds_its_parse_children(overlay):
    """RLIMIT_AS caps each parse child at PARSE_MEMORY_BYTES, and every worker may run one:
    past the pod's limit the kernel kills a process of the pod before any cap is reached."""
    ingest = overlay.workloads["ingest"]
    environment = dict(overlay.config)
    environment.update({each["name"]: each["value"] for each in container(ingest).get("env", [])})
    fields = settings_class_of("ingest").model_fields
    workers = int(environment.get("RAGMESH_INGEST_WORKERS", fields["workers"].default))
    parse_bytes = int(
        environment.get("RAGMESH_INGEST_PARSE_MEMORY_BYTES", fields["parse_memory_bytes"].default)
    )
    limit = memory_bytes(container(ingest)["resources"]["limits"]["memory"])
    needed = workers * parse_bytes + INGEST_SERVICE_BYTES
    assert limit >= needed, (
        f"{overlay.name}: ingest's memory limit is {limit / 2**20:g} MiB, under {workers} "
        f"parse children of {parse_bytes / 2**20:g} MiB and the service "
        f"({needed / 2**20:g} MiB)"
    )


def selected_by(selector: dict, labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        present, values = key in labels, expression.get("values", [])
        if not {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels[key] not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def budgets_of(overlay: Rendered, workload: dict) -> list[dict]:
    return [
        pdb
        for pdb in overlay.of_kind("PodDisruptionBudget").values()
        if selected_by(pdb["spec"]["selector"], pod_labels(workload))
    ]


def test_gpu_clusters_autoscale_the_cpu_services(gpu_overlay):
    autoscalers = gpu_overlay.of_kind("HorizontalPodAutoscaler")
    assert set(autoscalers) == set(SCALED)
    for name, hpa in autoscalers.items():
        spec = hpa["spec"]
        assert spec["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert 2 <= spec["minReplicas"] < spec["maxReplicas"], name
        (metric,) = spec["metrics"]
        assert metric["resource"]["name"] == "cpu"
        # Utilisation is measured against the requests.
        assert container(gpu_overlay.workloads[name])["resources"]["requests"]["cpu"]
        # The HPA owns the count: applying the manifests again never resets it.
        assert "replicas" not in gpu_overlay.workloads[name]["spec"], name


def test_every_multi_replica_workload_and_database_has_a_disruption_budget(overlay):
    autoscaled = set(overlay.of_kind("HorizontalPodAutoscaler"))
    for name, workload in overlay.workloads.items():
        if workload["kind"] == "DaemonSet":
            continue  # drains leave DaemonSet pods alone
        budgets = budgets_of(overlay, workload)
        if name in DATABASES:
            # One pod: a drain waits for the operator instead of taking the database down.
            (budget,) = budgets
            assert budget["spec"]["maxUnavailable"] == 0, name
        elif name in autoscaled or workload["spec"].get("replicas", 1) > 1:
            (budget,) = budgets
            assert budget["spec"] == {
                "maxUnavailable": 1,
                "selector": budget["spec"]["selector"],
            }, name
        else:
            # A budget on a single replica would block every drain.
            assert not budgets, name
    for pdb in overlay.of_kind("PodDisruptionBudget").values():
        assert any(budgets_of(overlay, w) for w in overlay.workloads.values()), pdb


def test_only_single_replica_workloads_hold_a_read_write_once_volume(overlay):
    """A ReadWriteOnce volume is one node's: a second replica (or a surge) could not mount it."""
    autoscaled = set(overlay.of_kind("HorizontalPodAutoscaler"))
    claims = overlay.of_kind("PersistentVolumeClaim")
    for name, workload in overlay.workloads.items():
        for volume in pod_spec(workload).get("volumes", []):
            if "persistentVolumeClaim" not in volume:
                continue
            modes = claims[volume["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"]
            if modes == ["ReadWriteOnce"]:
                assert name not in autoscaled and workload["spec"].get("replicas", 1) == 1, name
                assert workload["spec"]["strategy"]["type"] == "Recreate", name
            else:
                assert modes == ["ReadWriteMany"], name


def test_gpu_clusters_run_several_replicas_of_envoy_and_the_cpu_services(gpu_overlay):
    assert gpu_overlay.workloads["envoy"]["spec"]["replicas"] >= 2
    for name in SCALED:
        spec = gpu_overlay.workloads[name]["spec"]
        assert spec.get("strategy", {}).get("type", "RollingUpdate") == "RollingUpdate", name
        assert pod_spec(gpu_overlay.workloads[name])["topologySpreadConstraints"], name


# -- Databases ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay_name", ("dev", "gpu"))
def test_databases_are_statefulsets_the_services_point_at(secrets, overlay_name):
    overlay = Rendered(overlay_name, render(K8S / "overlays" / overlay_name))
    for name in DATABASES:
        assert overlay[("StatefulSet", name)]["spec"]["volumeClaimTemplates"]
        assert overlay[("Service", name)]["spec"]["clusterIP"] == "None"
    for name in ("ingest", "sessions"):
        prefix = f"RAGMESH_{name.upper()}_"
        secret = own_secret(secrets, name)
        url = urlsplit(secret[prefix + "DATABASE_URL"])
        assert url.scheme == "postgresql+asyncpg"
        assert (url.hostname, url.port, url.path) == ("postgres", 5432, f"/{name}")
        assert unquote(url.password) == own_secret(secrets, "postgres")["POSTGRES_PASSWORD"]
        assert overlay.config[prefix + "QDRANT_URL"] == "http://qdrant:6333"
        qdrant_key = own_secret(secrets, "qdrant")["QDRANT__SERVICE__API_KEY"]
        assert secret[prefix + "QDRANT_API_KEY"] == qdrant_key


def test_external_data_runs_no_database_and_points_at_external_endpoints():
    rendered = Rendered("external-data", render(K8S / "overlays" / "external-data"))
    names = {doc["metadata"]["name"] for doc in rendered.docs}
    assert not names & {"postgres", "qdrant", "postgres-init"}
    for name in ("ingest", "sessions"):
        url = urlsplit(rendered.config[f"RAGMESH_{name.upper()}_QDRANT_URL"])
        assert url.scheme == "https" and url.hostname not in names and url.port == 6333


# -- Network policies ----------------------------------------------------------------------


def policies(overlay: Rendered, labels: dict[str, str], direction: str) -> list[dict] | None:
    """The policies of one direction that select a pod; None when none does (all open)."""
    found = [
        p["spec"]
        for p in overlay.of_kind("NetworkPolicy").values()
        if direction in p["spec"]["policyTypes"] and selected_by(p["spec"]["podSelector"], labels)
    ]
    return found or None


def port_in(rule: dict, port: int, protocol: str = "TCP") -> bool:
    ports = rule.get("ports")
    return not ports or any(
        p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports
    )


def peer_is_pod(peer: dict, labels: dict[str, str]) -> bool:
    """A peer naming pods of the policy's own namespace, matching labels."""
    return set(peer) == {"podSelector"} and selected_by(peer["podSelector"], labels)


def allows(overlay: Rendered, source: dict, target: dict, port: int) -> bool:
    """Whether a TCP connection from one pod to another's port gets through both ends."""
    out = policies(overlay, source, "Egress")
    into = policies(overlay, target, "Ingress")
    egress = out is None or any(
        port_in(rule, port)
        and ("to" not in rule or any(peer_is_pod(peer, target) for peer in rule["to"]))
        for spec in out
        for rule in spec.get("egress", [])
    )
    ingress = into is None or any(
        port_in(rule, port)
        and ("from" not in rule or any(peer_is_pod(peer, source) for peer in rule["from"]))
        for spec in into
        for rule in spec.get("ingress", [])
    )
    return egress and ingress


def upstreams_the_code_names(overlay: Rendered, secrets) -> set[tuple[str, str, int]]:
    """(caller, workload, port) for every in-cluster address a pod is configured with."""
    services = {name: doc for name, doc in overlay.of_kind("Service").items()}
    edges = set()

    def workload_of(service: dict) -> str:
        (name,) = [
            name
            for name, workload in overlay.workloads.items()
            if service["spec"]["selector"].items() <= pod_labels(workload).items()
        ]
        return name

    def add(caller: str, address: str) -> None:
        if "://" in address:
            url = urlsplit(address)
            host, port = url.hostname, url.port
        else:
            host, _, port = address.rpartition(":")
            port = int(port)
        if host == "localhost":
            return
        if host in services:
            assert port in [p["port"] for p in services[host]["spec"]["ports"]], address
            edges.add((caller, workload_of(services[host]), port))
        else:
            # Only the databases may live outside the cluster.
            assert not overlay.databases_inside and port in DATABASES.values(), address

    for name in PORTS:
        prefix = f"RAGMESH_{name.upper()}_"
        values = {**overlay.config, **own_secret(secrets, name)}
        for key, value in values.items():
            if not key.startswith(prefix):
                continue
            field = key.removeprefix(prefix).lower()
            if field.endswith("_target") or field.endswith("_url"):
                if value:
                    add(name, value)
            elif field.endswith("_targets"):
                for address in json.loads(value).values():
                    add(name, address)
            elif field == "peers":
                for address in json.loads(value):
                    add(name, address)
    for cluster in yaml.safe_load((ENVOY / "envoy.yaml").read_text())["static_resources"][
        "clusters"
    ]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                address = endpoint["endpoint"]["address"]["socket_address"]
                add("envoy", f"{address['address']}:{address['port_value']}")
    return edges


def test_network_policies_allow_exactly_the_calls_the_code_makes(overlay, secrets):
    """Default deny; each allowed pod-to-pod edge is one a setting or envoy.yaml names."""
    (deny,) = [
        p
        for p in overlay.of_kind("NetworkPolicy").values()
        if p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    labels = {name: pod_labels(w) for name, w in overlay.workloads.items()}
    ports = {
        name: [p["containerPort"] for p in container(w)["ports"]]
        for name, w in overlay.workloads.items()
    }
    allowed = {
        (source, target, port)
        for source in labels
        for target in labels
        for port in ports[target]
        if allows(overlay, labels[source], labels[target], port)
    }
    expected = upstreams_the_code_names(overlay, secrets)
    assert allowed == expected
    # The edges the issue names, read the other way round.
    for edge in [
        ("sessions", "ingest", 50051),
        ("sessions", "embed", 50052),
        ("sessions", "llm", 50053),
        ("ingest", "embed", 50052),
        *(("telemetry", name, PORTS[name]) for name in PORTS if name != "telemetry"),
        # Between the pods of the DaemonSet, one per node.
        ("telemetry", "telemetry", PORTS["telemetry"]),
    ]:
        assert edge in allowed, edge
    data_owners = {source for source, target, _ in allowed if target in DATABASES}
    assert data_owners <= {"ingest", "sessions"}


def test_only_envoy_is_reachable_from_outside_the_namespace(overlay):
    open_to_outside = set()
    for name, workload in overlay.workloads.items():
        for spec in policies(overlay, pod_labels(workload), "Ingress") or [{"ingress": [{}]}]:
            for rule in spec.get("ingress", []):
                if "from" not in rule or any(set(peer) != {"podSelector"} for peer in rule["from"]):
                    open_to_outside.add(name)
    assert open_to_outside == {"envoy"}
    envoy = policies(overlay, pod_labels(overlay.workloads["envoy"]), "Ingress")
    (rule,) = [rule for spec in envoy for rule in spec.get("ingress", [])]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]


def test_every_pod_may_resolve_names_and_only_data_owners_leave_the_cluster(overlay):
    for name, workload in overlay.workloads.items():
        rules = [
            rule
            for spec in policies(overlay, pod_labels(workload), "Egress")
            for rule in spec.get("egress", [])
        ]
        dns = [
            rule
            for rule in rules
            if any(
                peer.get("podSelector") == {"matchLabels": {"k8s-app": "kube-dns"}}
                for peer in rule.get("to", [])
            )
        ]
        assert dns and port_in(dns[0], 53, "UDP") and port_in(dns[0], 53, "TCP"), name
        external = [
            peer["ipBlock"] for rule in rules for peer in rule.get("to", []) if "ipBlock" in peer
        ]
        if overlay.databases_inside or name not in ("ingest", "sessions"):
            assert not external, name
        else:
            assert all(ipaddress.ip_network(block["cidr"]) for block in external)
            ports = {
                p["port"]
                for rule in rules
                if any("ipBlock" in peer for peer in rule.get("to", []))
                for p in rule["ports"]
            }
            assert ports == set(DATABASES.values()), name


# -- Envoy -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def envoy() -> dict:
    return yaml.safe_load((ENVOY / "envoy.yaml").read_text())


def routes(envoy: dict) -> list[dict]:
    (listener,) = envoy["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    (host,) = manager["typed_config"]["route_config"]["virtual_hosts"]
    return host["routes"]


def route_for(envoy: dict, path: str, headers: dict[str, str] | None = None) -> dict:
    """The first route matching a request, as Envoy picks it."""
    headers = headers or {}
    for route in routes(envoy):
        match = route["match"]
        if not path.startswith(match["prefix"]):
            continue
        wanted = {h["name"]: h["string_match"]["exact"] for h in match.get("headers", [])}
        if all(headers.get(key) == value for key, value in wanted.items()):
            return route["route"]
    raise AssertionError(f"no route for {path}")


def test_envoy_never_cuts_streams_by_itself(envoy):
    (listener,) = envoy["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["stream_idle_timeout"] == "0s"
    for route in routes(envoy):
        assert route["route"]["timeout"] == "0s"


@pytest.mark.parametrize("name", PORTS)
def test_envoy_routes_each_service_to_its_healthy_http2_cluster(envoy, name):
    full_name = full_service_name(name)
    route = route_for(envoy, f"/{full_name}/AnyMethod")
    assert route["cluster"] == name
    assert route["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}
    (cluster,) = (c for c in envoy["static_resources"]["clusters"] if c["name"] == name)
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": name,
        "port_value": PORTS[name],
    }
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"] == {"service_name": full_name}
    # Health, reflection and metrics of this service, picked by header.
    for path in (
        "/grpc.reflection.v1.ServerReflection/X",
        "/grpc.health.v1.Health/Check",
        "/ragmesh.telemetry.v1.MetricsService/GetServiceMetrics",
    ):
        assert route_for(envoy, path, {"ragmesh-service": name})["cluster"] == name


def test_envoy_routes_every_service_of_every_proto(envoy):
    for path in sorted((ROOT / "protos" / "ragmesh").rglob("*.proto")):
        text = path.read_text()
        package = re.search(r"^package\s+([\w.]+);", text, re.M).group(1)
        for service in re.findall(r"^service\s+(\w+)\s*{", text, re.M):
            assert route_for(envoy, f"/{package}.{service}/AnyMethod")["cluster"] in PORTS


def test_envoy_sends_reflection_health_and_metrics_to_telemetry_by_default(envoy):
    for path in (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.health.v1.Health/Check",
        "/ragmesh.telemetry.v1.MetricsService/GetServiceMetrics",
    ):
        assert route_for(envoy, path)["cluster"] == "telemetry"


def test_envoy_config_matches_the_envoy_api(envoy):
    bootstrap_pb2 = pytest.importorskip("envoy.config.bootstrap.v3.bootstrap_pb2")
    from google.protobuf import json_format

    # The typed_config types, registered so that Any fields are checked too.
    for module in (
        "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
        "envoy.extensions.filters.http.router.v3.router_pb2",
        "envoy.extensions.access_loggers.stream.v3.stream_pb2",
        "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
    ):
        importlib.import_module(module)
    json_format.ParseDict(envoy, bootstrap_pb2.Bootstrap())


# -- Images ----------------------------------------------------------------------------------


def test_dockerfile_builds_exactly_the_service_extras_for_cpu_or_cuda():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(PORTS) <= set(extras)
    # The CUDA llm image quantizes with bitsandbytes and runs GGUF on llama.cpp.
    assert any(dep.startswith("bitsandbytes") for dep in extras["llm"])
    assert any(dep.startswith("llama-cpp-python") for dep in extras["llm"])
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    accepted = re.search(r'case "\$SERVICE" in ([\w|]+)\)', dockerfile).group(1)
    assert set(accepted.split("|")) == set(PORTS)
    accelerators = re.search(r'case "\$ACCELERATOR" in ([\w|]+)\)', dockerfile).group(1)
    assert set(accelerators.split("|")) == {"cpu", "cuda"}
    assert 'pip install ".[${SERVICE}]"' in dockerfile
    # CPU images take PyTorch's CPU index; CUDA ones PyPI's build, which bundles CUDA.
    cpu = re.search(r"embed/cpu\|llm/cpu\) (.*);;", dockerfile).group(1)
    assert "https://download.pytorch.org/whl/cpu" in cpu
    cuda = re.search(r"embed/cuda\|llm/cuda\) (.*);;", dockerfile).group(1)
    assert "index-url" not in cuda and "torch==" in cuda
    assert 'CMAKE_ARGS="$LLAMA_CMAKE_ARGS"' in dockerfile
    # The pods' runAsUser.
    assert re.search(r"^USER 10001$", dockerfile, re.M)
