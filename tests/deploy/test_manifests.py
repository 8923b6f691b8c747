"""The deploy/ manifests: Kubernetes (kustomize), Envoy and the Dockerfile agree with the code."""

import importlib
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from services.common.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ENVOY = DEPLOY / "envoy"
PORTS = {"ingest": 50051, "embed": 50052, "llm": 50053, "sessions": 50054, "telemetry": 50055}
SECRET = "ragmesh-secrets"


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
def secret() -> dict[str, str]:
    (doc,) = load_all(K8S / "secret.example.yaml")
    assert doc["kind"] == "Secret" and doc["metadata"]["name"] == SECRET
    return doc["stringData"]


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
def test_every_service_listens_on_the_pod_network_with_credentials(k8s, config, secret, name):
    """Beyond loopback without API keys a service refuses to start."""
    assert config[f"RAGMESH_{name.upper()}_HOST"] == "0.0.0.0"
    sources = container(k8s[("Deployment", name)])["envFrom"]
    assert {"secretRef": {"name": SECRET}} in sources
    assert {"configMapRef": {"name": "ragmesh-config"}} in sources
    keys = json.loads(secret[f"RAGMESH_{name.upper()}_API_KEYS"])
    assert keys and all(isinstance(value, str) for value in keys.values())


@pytest.mark.parametrize("name", PORTS)
def test_setting_names_exist_in_the_settings_class(config, secret, name):
    """Each RAGMESH_<SERVICE>_* name in the ConfigMap and Secret is a field the service reads."""
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
    prefix = f"RAGMESH_{name.upper()}_"
    names = {
        key.removeprefix(prefix).lower() for key in {*config, *secret} if key.startswith(prefix)
    }
    assert names - set(settings_class.model_fields) == set()


def test_only_llm_asks_for_a_gpu_and_it_lands_on_gpu_nodes(k8s):
    for name in PORTS:
        resources = container(k8s[("Deployment", name)])["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"]
        gpus = resources.get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (1 if name == "llm" else None), name
    pod = k8s[("Deployment", "llm")]["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_databases_are_statefulsets_the_services_point_at(k8s, config, secret):
    for name in ("postgres", "qdrant"):
        assert k8s[("StatefulSet", name)]["spec"]["volumeClaimTemplates"]
        assert k8s[("Service", name)]["spec"]["clusterIP"] == "None"
    for name in ("ingest", "sessions"):
        prefix = f"RAGMESH_{name.upper()}_"
        assert secret[prefix + "DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert "@postgres:5432/" in secret[prefix + "DATABASE_URL"]
        assert config[prefix + "QDRANT_URL"] == "http://qdrant:6333"
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
