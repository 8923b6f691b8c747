"""The deploy/ manifests: Kubernetes (kustomize), Envoy and the Dockerfile agree with the code."""

import importlib
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from services.common.context import ADMIN_SCOPE, parse_principal
from services.common.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ENVOY = DEPLOY / "envoy"
PORTS = {"ingest": 50051, "embed": 50052, "llm": 50053, "sessions": 50054, "telemetry": 50055}
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


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def full_service_name(name: str) -> str:
    """ragmesh.<name>.v1.<Service>, read from the service's .proto file."""
    text = (ROOT / "protos" / "ragmesh" / name / "v1" / f"{name}.proto").read_text()
    package = re.search(r"^package\s+([\w.]+);", text, re.M).group(1)
    service = re.search(r"^service\s+(\w+)\s*{", text, re.M).group(1)
    return f"{package}.{service}"


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    """Every resource of the kustomization (Envoy's included), by (kind, name)."""
    docs = {}
    for directory in (K8S, ENVOY):
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for resource in kustomization["resources"]:
            if (directory / resource).is_file():
                for doc in load_all(directory / resource):
                    docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


@pytest.fixture(scope="module")
def config(k8s) -> dict[str, str]:
    return k8s[("ConfigMap", "ragmesh-config")]["data"]


@pytest.fixture(scope="module")
def secrets() -> dict[str, dict[str, str]]:
    """The Secrets of secret.example.yaml, by name: their stringData."""
    docs = load_all(K8S / "secret.example.yaml")
    assert all(doc["kind"] == "Secret" for doc in docs)
    found = {doc["metadata"]["name"]: doc["stringData"] for doc in docs}
    assert len(found) == len(docs), "a Secret is defined twice"
    assert set(found) == set(OWN_SECRET.values())
    return found


def own_secret(secrets: dict[str, dict[str, str]], name: str) -> dict[str, str]:
    return secrets[OWN_SECRET[name]]


def api_keys(secrets: dict[str, dict[str, str]], name: str) -> dict[str, str]:
    return json.loads(own_secret(secrets, name)[f"RAGMESH_{name.upper()}_API_KEYS"])


def settings_class_of(name: str) -> type[ServiceSettings]:
    try:
        module = importlib.import_module(f"services.{name}.settings")
    except ModuleNotFoundError:
        pytest.skip(f"services/{name}/settings.py does not exist yet")
    (settings_class,) = (
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, ServiceSettings)
        and value is not ServiceSettings
    )
    return settings_class


def workloads(k8s) -> dict[str, dict]:
    """Every Deployment and StatefulSet (Envoy's included), by name."""
    kinds = {"Deployment", "StatefulSet"}
    found = {name: doc for (kind, name), doc in k8s.items() if kind in kinds}
    assert set(found) == {*OWN_SECRET, "envoy"}
    return found


def secret_refs(workload: dict) -> dict[str, set[str] | None]:
    """Secret name -> the entries a pod template reads from it (None: all of them)."""
    spec = workload["spec"]["template"]["spec"]
    refs: dict[str, set[str] | None] = {}

    def add(name: str, key: str | None = None) -> None:
        if key is None:
            refs[name] = None
        elif refs.get(name, set()) is not None:
            refs.setdefault(name, set()).add(key)

    for each in [*spec.get("initContainers", []), *spec["containers"]]:
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


@pytest.fixture(scope="module")
def envoy() -> dict:
    return yaml.safe_load((ENVOY / "envoy.yaml").read_text())


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def test_every_yaml_parses_and_every_manifest_is_used():
    files = sorted(DEPLOY.rglob("*.y*ml"))
    assert files
    for path in files:
        assert load_all(path), path
    for directory in (K8S, ENVOY):
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        listed = {
            (directory / entry).resolve()
            for key in ("resources", "configMapGenerator")
            for item in kustomization.get(key, [])
            for entry in (item.get("files", []) if isinstance(item, dict) else [item])
        }
        for entry in listed:
            assert entry.exists(), entry
        unused = {
            path.resolve()
            for path in directory.glob("*.yaml")
            if path.name not in {"kustomization.yaml", "secret.example.yaml"}
        } - listed
        assert not unused, f"not in {directory}/kustomization.yaml: {unused}"


@pytest.mark.parametrize("name", PORTS)
def test_service_and_deployment_agree_on_the_port(k8s, config, name):
    port = PORTS[name]
    service, deployment = k8s[("Service", name)], k8s[("Deployment", name)]
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    assert [p["containerPort"] for p in container(deployment)["ports"]] == [port]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert config[f"RAGMESH_{name.upper()}_PORT"] == str(port)
    assert container(deployment)["image"] == f"ragmesh/{name}"


@pytest.mark.parametrize("name", PORTS)
def test_probes_are_grpc_on_the_service_port(k8s, name):
    probed = container(k8s[("Deployment", name)])
    assert "readinessProbe" in probed and "livenessProbe" in probed
    # Readiness asks the server's overall health; startup and liveness the "liveness"
    # name, which stays SERVING while a model loads.
    assert probed["readinessProbe"]["grpc"] == {"port": PORTS[name]}
    for kind in ("startupProbe", "livenessProbe"):
        if kind in probed:
            assert probed[kind]["grpc"] == {"port": PORTS[name], "service": "liveness"}, kind


@pytest.mark.parametrize("name", PORTS)
def test_termination_grace_exceeds_the_drain(k8s, config, name):
    spec = k8s[("Deployment", name)]["spec"]["template"]["spec"]
    grace = float(config[f"RAGMESH_{name.upper()}_SHUTDOWN_GRACE_SECONDS"])
    pre_stop = container(k8s[("Deployment", name)])["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > grace + float(pre_stop[1])


@pytest.mark.parametrize("name", PORTS)
def test_every_service_listens_on_the_pod_network_with_credentials(k8s, config, secrets, name):
    """Beyond loopback without API keys a service refuses to start."""
    assert config[f"RAGMESH_{name.upper()}_HOST"] == "0.0.0.0"
    sources = container(k8s[("Deployment", name)])["envFrom"]
    assert sources == [
        {"configMapRef": {"name": "ragmesh-config"}},
        {"secretRef": {"name": OWN_SECRET[name]}},
    ]
    keys = api_keys(secrets, name)
    assert keys and all(isinstance(value, str) for value in keys.values())
    for principal in keys.values():
        assert parse_principal(principal).tenant  # a key without a tenant stops the service


def test_every_pod_refers_only_to_its_own_secret(k8s):
    for name, workload in workloads(k8s).items():
        refs = secret_refs(workload)
        if name == "envoy":
            assert refs == {}, name
        elif name in STORE_KEY:
            assert refs == {OWN_SECRET[name]: {STORE_KEY[name]}}, name
        else:
            assert refs == {OWN_SECRET[name]: None}, name


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
    for doc in load_all(K8S / "secret.example.yaml"):
        assert doc["metadata"]["namespace"] == "ragmesh"
        assert doc["type"] == "Opaque"


def test_no_credential_reaches_a_pod_that_does_not_need_it(k8s, config, secrets):
    postgres, qdrant = (own_secret(secrets, name)[key] for name, key in STORE_KEY.items())
    needs = {
        postgres: {"postgres", "ingest", "sessions"},
        qdrant: {"qdrant", "ingest", "sessions"},
        **{key: set(USER_FACING) for key in api_keys(secrets, "ingest")},
    }
    for caller in EMBED_CALLERS:
        needs[own_secret(secrets, caller)[f"RAGMESH_{caller.upper()}_EMBED_API_KEY"]] = {
            caller,
            "embed",
        }
    seen = {name: secret_values(w, secrets) for name, w in workloads(k8s).items()}
    text = {name: "\n".join(values.values()) for name, values in seen.items()}
    for credential, pods in needs.items():
        holders = {name for name in seen if credential in text[name]}
        assert holders == pods, credential
        # Every pod takes the whole ConfigMap.
        assert credential not in "\n".join(config.values())
    # For example: llm's pod sees neither the database nor Qdrant, embed no user key.
    assert not any("DATABASE_URL" in key or "QDRANT" in key for key in seen["llm"])
    assert set(api_keys(secrets, "embed")).isdisjoint(api_keys(secrets, "ingest"))


def test_user_keys_are_the_same_wherever_a_users_call_reaches(secrets):
    """The same keys and principals in ingest, llm, sessions and telemetry; admin only in llm."""
    keys = {name: api_keys(secrets, name) for name in USER_FACING}
    for name in USER_FACING:
        assert set(keys[name]) == set(keys["ingest"]), name
        for key, value in keys[name].items():
            principal, first = parse_principal(value), parse_principal(keys["ingest"][key])
            assert (principal.subject, principal.tenant) == (first.subject, first.tenant), name
    # LoadModel, UnloadModel and UpdateGenerationConfig need admin: the operator's key has
    # it in llm, ordinary user keys have no scope.
    scopes = [parse_principal(value).scopes for value in keys["llm"].values()]
    assert frozenset({ADMIN_SCOPE}) in scopes and frozenset() in scopes


def test_services_that_call_embed_send_a_key_embed_accepts(config, secrets):
    """ingest's background indexing calls embed with ingest's own key (sessions' likewise)."""
    accepted = api_keys(secrets, "embed")
    sent = {}
    for caller in EMBED_CALLERS:
        prefix = f"RAGMESH_{caller.upper()}_"
        assert config[prefix + "EMBED_TARGET"] == f"embed:{PORTS['embed']}"
        sent[caller] = own_secret(secrets, caller)[prefix + "EMBED_API_KEY"]
        principal = parse_principal(accepted[sent[caller]])
        assert principal.subject == caller and principal.tenant
        assert not principal.scopes
    # Each caller has a key of its own, and embed holds only theirs.
    assert len(set(sent.values())) == len(sent)
    assert set(accepted) == set(sent.values())


@pytest.mark.parametrize("name", PORTS)
def test_setting_names_exist_in_the_settings_class(config, secrets, name):
    """Each RAGMESH_<SERVICE>_* name in the ConfigMap and its Secret is a field it reads."""
    settings_class = settings_class_of(name)
    prefix = f"RAGMESH_{name.upper()}_"
    secret = own_secret(secrets, name)
    names = {
        key.removeprefix(prefix).lower() for key in {*config, *secret} if key.startswith(prefix)
    }
    assert names - set(settings_class.model_fields) == set()


@pytest.mark.parametrize("name", PORTS)
def test_each_service_starts_with_its_pods_environment(monkeypatch, config, secrets, name):
    """The ConfigMap and the service's own Secret validate, credentials included."""
    settings_class = settings_class_of(name)
    for key in [key for key in os.environ if key.startswith("RAGMESH_")]:
        monkeypatch.delenv(key)
    for key, value in {**config, **own_secret(secrets, name)}.items():
        monkeypatch.setenv(key, value)
    settings = settings_class()
    settings.check_exposure()
    assert settings.auth_configured and not settings.auth_disabled


def test_only_llm_asks_for_a_gpu_and_it_lands_on_gpu_nodes(k8s):
    for name in PORTS:
        resources = container(k8s[("Deployment", name)])["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"]
        gpus = resources.get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (1 if name == "llm" else None), name
    pod = k8s[("Deployment", "llm")]["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_databases_are_statefulsets_the_services_point_at(k8s, config, secrets):
    for name in ("postgres", "qdrant"):
        assert k8s[("StatefulSet", name)]["spec"]["volumeClaimTemplates"]
        assert k8s[("Service", name)]["spec"]["clusterIP"] == "None"
    for name in ("ingest", "sessions"):
        prefix = f"RAGMESH_{name.upper()}_"
        secret = own_secret(secrets, name)
        url = urlsplit(secret[prefix + "DATABASE_URL"])
        assert url.scheme == "postgresql+asyncpg"
        assert (url.hostname, url.port, url.path) == ("postgres", 5432, f"/{name}")
        assert unquote(url.password) == own_secret(secrets, "postgres")["POSTGRES_PASSWORD"]
        assert config[prefix + "QDRANT_URL"] == "http://qdrant:6333"
        qdrant_key = own_secret(secrets, "qdrant")["QDRANT__SERVICE__API_KEY"]
        assert secret[prefix + "QDRANT_API_KEY"] == qdrant_key
        claim = k8s[("Deployment", name)]["spec"]["template"]["spec"]["volumes"][0]
        assert ("PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"]) in k8s


def test_upstream_targets_name_real_services(config):
    assert config["RAGMESH_INGEST_EMBED_TARGET"] == f"embed:{PORTS['embed']}"
    mesh = json.loads(config["RAGMESH_TELEMETRY_MESH_TARGETS"])
    assert set(mesh) == set(PORTS)
    for name, target in mesh.items():
        assert target.endswith(f":{PORTS[name]}")


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
    # Health and reflection of this service, picked by header.
    for path in ("/grpc.reflection.v1.ServerReflection/X", "/grpc.health.v1.Health/Check"):
        assert route_for(envoy, path, {"ragmesh-service": name})["cluster"] == name


def test_envoy_sends_reflection_and_health_to_telemetry_by_default(envoy):
    for path in (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.health.v1.Health/Check",
    ):
        assert route_for(envoy, path)["cluster"] == "telemetry"


def test_dockerfile_builds_exactly_the_service_extras():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(PORTS) <= set(extras)
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    accepted = re.search(r'case "\$SERVICE" in ([\w|]+)\)', dockerfile).group(1)
    assert set(accepted.split("|")) == set(PORTS)
    assert 'pip install ".[${SERVICE}]"' in dockerfile
    assert "https://download.pytorch.org/whl/cpu" in dockerfile


@pytest.fixture(scope="module")
def built() -> list[dict]:
    """`kubectl kustomize deploy/k8s`, the exact objects `kubectl apply -k` sends."""
    if kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize", str(K8S)]
    elif kustomize := shutil.which("kustomize"):
        command = [kustomize, "build", str(K8S)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_kustomize_builds_everything_into_the_namespace(built):
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in built}
    for name in PORTS:
        assert {("Deployment", name), ("Service", name)} <= kinds
    assert ("Deployment", "envoy") in kinds
    # The Secrets are applied on their own, never with defaults from the repository.
    assert not any(kind == "Secret" for kind, _ in kinds)
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "ragmesh", doc["metadata"]["name"]
    images = {
        c["image"]
        for doc in built
        if doc["kind"] == "Deployment"
        for c in doc["spec"]["template"]["spec"]["containers"]
    }
    assert {f"ragmesh/{name}:0.1.0" for name in PORTS} <= images


def test_manifests_match_the_kubernetes_schemas(built):
    validate = pytest.importorskip("kubernetes_validate")
    for doc in [*built, *load_all(K8S / "secret.example.yaml")]:
        validate.validate(doc, "1.30.0", strict=True)


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
