"""deploy/ checked without a cluster or Docker: every kustomize overlay (alone and with the
optional components) is built by a real kustomize (`kubectl kustomize`) and its objects are
validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields
fail) of the oldest supported and the newest bundled version; then every reference resolves
(selectors, ports, volumes, Secrets, settings, autoscaling targets, metric names), pods are
hardened, shutdown fits the grace period, and the generated dashboard and monitoring manifests
match their generator. The compose file and Grafana provisioning are checked the same way."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry

from service.api.server import start
from service.client import Client
from service.config import Settings
from service.monitoring.metrics import Metrics
from tests.conftest import MODELS, ROOT, settings_for
from tests.redis_process import RedisProcess

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("standalone", "sidecar")
COMPONENTS = ("monitoring", "keda")
# Every build the suite checks: each overlay alone, with each component, and with both.
BUILDS = [(o, c) for o in OVERLAYS for c in ((), ("monitoring",), ("monitoring", "keda"))] + [
    ("standalone", ("keda",))]
KUBERNETES = ("1.30.0", kubernetes_validate.latest_version())  # ContainerResource is GA in 1.30
CRDS = {"ServiceMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1",
        "ScaledObject": "keda.sh/v1alpha1"}  # no schema bundled: checked field by field below
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
Json = dict[str, Any]


# -------------------------------------------------------------------------------- kustomize


def kustomize_command() -> list[str] | None:
    """A kustomize v4+: standalone or kubectl's, on PATH or in this Python's bin (where
    `make install` puts kubectl when PATH has none that is recent enough); else None."""
    for name, args in (("kustomize", ["build"]), ("kubectl", ["kustomize"])):
        for folder in (None, str(Path(sys.executable).parent)):
            found = shutil.which(name, path=folder)
            if found and kustomize_major(found, name) >= 4:
                return [found, *args]
    return None


def kustomize_major(binary: str, name: str) -> int:
    """The major version of kustomize (standalone, or inside kubectl); 0 if unknown."""
    asked = [binary, "version"] if name == "kustomize" else [binary, "version", "--client"]
    version = subprocess.run(asked, capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"(?:Kustomize Version: |^)v?(\d+)\.", version, re.M)
    return int(match.group(1)) if match else 0


KUSTOMIZE = kustomize_command()
needs_kustomize = pytest.mark.skipif(
    KUSTOMIZE is None, reason="no kustomize v4+: `make install` puts kubectl (with kustomize) in "
    ".venv/bin when none is on PATH (Debian's kubernetes-client 1.20 is too old)")


@functools.cache
def build(overlay: str, components: tuple[str, ...] = ()) -> list[Json]:
    """The objects `kubectl apply -k` would create from the overlay plus the components."""
    assert KUSTOMIZE is not None
    with tempfile.TemporaryDirectory() as tmp:
        rel = os.path.relpath(K8S, tmp)
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
            "resources": [f"{rel}/overlays/{overlay}"],
            "components": [f"{rel}/components/{c}" for c in components]}))
        done = subprocess.run([*KUSTOMIZE, tmp], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def objects_of(objects: list[Json], kind: str) -> list[Json]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Json], kind: str, name: str) -> Json:
    found = [o for o in objects_of(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pods(objects: list[Json]) -> list[Json]:
    """Pod templates of every Deployment."""
    return [d["spec"]["template"] for d in objects_of(objects, "Deployment")]


def sidelight_pod(objects: list[Json]) -> Json:
    found = [p for p in pods(objects) if "sidelight" in names(p["spec"]["containers"])]
    assert len(found) == 1
    return found[0]


def names(items: list[Json]) -> list[str]:
    return [i["name"] for i in items]


def container(pod: Json, name: str) -> Json:
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


def env_of(c: Json) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def port_names(pod: Json) -> set[str]:
    return {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}


BUILD_IDS = [f"{o}+{'+'.join(c)}" if c else o for o, c in BUILDS]


@pytest.fixture(params=BUILDS, ids=BUILD_IDS)
def built(request: pytest.FixtureRequest) -> list[Json]:
    if KUSTOMIZE is None:
        pytest.skip("no kustomize v4+ (make install)")
    return build(*request.param)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> list[Json]:
    if KUSTOMIZE is None:
        pytest.skip("no kustomize v4+ (make install)")
    return build(request.param)


# ------------------------------------------------------------------------- schemas, structure


def test_every_build_validates_against_the_kubernetes_schemas() -> None:
    if KUSTOMIZE is None:
        pytest.skip("no kustomize v4+ (make install)")
    unique = {json.dumps(o, sort_keys=True): o for b in BUILDS for o in build(*b)}  # once each
    errors = []
    for o in unique.values():
        if o["kind"] in CRDS:
            assert o["apiVersion"] == CRDS[o["kind"]], o["kind"]
            continue
        for version in KUBERNETES:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                errors.append(f"{version} {o['kind']}/{o['metadata']['name']} "
                              f"{'.'.join(map(str, err.path))}: {err.message}")
    assert not errors, "\n".join(errors)


def test_every_build_keeps_the_base_and_adds_only_its_parts() -> None:
    if KUSTOMIZE is None:
        pytest.skip("no kustomize v4+ (make install)")
    kinds = {b: sorted(o["kind"] for o in build(*b)) for b in BUILDS}
    base = sorted(["ServiceAccount", "PersistentVolumeClaim", "PersistentVolumeClaim",
                   "Deployment", "Deployment", "Service", "Service", "Service",
                   "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
                   "NetworkPolicy"])
    assert kinds[("standalone", ())] == base
    assert kinds[("sidecar", ())] == sorted([*base, "Service"])  # model-server's ports
    monitoring = ["ConfigMap", "PrometheusRule", "ServiceMonitor"]
    assert kinds[("standalone", ("monitoring",))] == sorted([*base, *monitoring])
    keda = [k for k in base if k != "HorizontalPodAutoscaler"] + ["ScaledObject"]
    assert kinds[("standalone", ("keda",))] == sorted(keda)


def test_services_select_pods_and_name_their_ports(built: list[Json]) -> None:
    for service in objects_of(built, "Service"):
        selected = [p for p in pods(built) if selects(service["spec"]["selector"],
                                                      p["metadata"]["labels"])]
        assert len(selected) == 1, f"Service {service['metadata']['name']}: {len(selected)}"
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names(selected[0]), port
    for d in objects_of(built, "Deployment"):
        assert selects(d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"][
            "labels"])


def test_a_headless_service_lists_the_grpc_endpoints_for_client_side_balancing(
        overlay: list[Json]) -> None:
    headless = one(overlay, "Service", "sidelight-headless")["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is False
    assert [(p["port"], p["targetPort"]) for p in headless["ports"]] == [(50051, "grpc")]
    plain = one(overlay, "Service", "sidelight")["spec"]
    assert "clusterIP" not in plain and {p["name"] for p in plain["ports"]} == {"grpc", "metrics"}


def test_the_documented_client_options_spread_calls_over_every_replica(tmp_path: Path) -> None:
    """What the headless Service's DNS name gives a client (every pod's address), here two
    real replicas on loopback that each serve one differently named model: with docs/deploy.md's
    round_robin option calls alternate; with gRPC's default (one connection, as through a
    ClusterIP) every call lands on one replica."""
    apps = []
    for name in ("replica_a", "replica_b"):
        shutil.copytree(MODELS / "diabetes_linear", tmp_path / name / name)
        apps.append(start(settings_for(tmp_path / name, metrics_port=-1)))
    target = "ipv4:" + ",".join(f"127.0.0.1:{app.port}" for app in apps)
    try:
        for options, expected in (([("grpc.lb_policy_name", "round_robin")], 2), ([], 1)):
            with Client(target, options=options) as client:
                seen = {m.name for _ in range(8) for m in client.models()}
            assert len(seen) == expected, (options, seen)
    finally:
        for app in apps:
            app.stop(grace=0)


# ----------------------------------------------------------------------------- the Sidelight pod


def test_the_sidelight_container_matches_the_image_and_its_settings(overlay: list[Json]) -> None:
    pod = sidelight_pod(overlay)
    c, env = container(pod, "sidelight"), env_of(container(pod, "sidelight"))
    images = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["images"]
    assert c["image"] == f"{images[0]['newName']}:{images[0]['newTag']}"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": int(env["SIDELIGHT_PORT"]), "metrics": int(env[
        "SIDELIGHT_METRICS_PORT"])}
    exposed = re.search(r"^EXPOSE (.+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert exposed and set(map(int, exposed.group(1).split())) == set(ports.values())
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == ports["grpc"], probe
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == env["SIDELIGHT_METRICS_PORT"]
    known = {f"SIDELIGHT_{n.upper()}" for n in Settings.model_fields}
    assert {n for n in env if n.startswith("SIDELIGHT_")} <= known
    Settings(**{n.removeprefix("SIDELIGHT_").lower(): v for n, v in env.items()  # parse
                if n.startswith("SIDELIGHT_") and "$(" not in v})


def mount_of(pod: Json, c: Json, path: str) -> tuple[Json, Json]:
    """The volume mount at `path` in container c and the pod volume it mounts."""
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == path)
    return mount, next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])


def test_tokens_are_required_and_come_from_a_mounted_secret(overlay: list[Json]) -> None:
    pod = sidelight_pod(overlay)
    c = container(pod, "sidelight")
    env = env_of(c)
    assert env["SIDELIGHT_HOST"] == "0.0.0.0" and "SIDELIGHT_ALLOW_INSECURE" not in env
    mount, volume = mount_of(pod, c, env["SIDELIGHT_TOKENS_PATH"])
    assert mount["readOnly"] is True and volume["secret"]["secretName"] == "sidelight-tokens"
    assert volume["secret"]["defaultMode"] & 0o007 == 0  # not world-readable
    models, claim = mount_of(pod, c, env["SIDELIGHT_MODELS_DIR"])
    assert models["readOnly"] is True
    one(overlay, "PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"])


def test_every_pod_is_hardened(overlay: list[Json]) -> None:
    for pod in pods(overlay):
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
            assert sc.get("runAsUser", spec["securityContext"].get("runAsUser")) != 0
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), c["name"]
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]


def prestop_seconds(c: Json) -> float:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def test_shutdown_fits_in_the_termination_grace_period(overlay: list[Json]) -> None:
    """preStop (DNS and endpoints forget the pod), then SIGTERM: health NOT_SERVING for the
    drain, then calls in flight get the grace. The kubelet's kill must come after all three."""
    pod = sidelight_pod(overlay)
    c, defaults = container(pod, "sidelight"), Settings.model_fields
    env = env_of(c)
    drain = float(env.get("SIDELIGHT_SHUTDOWN_DRAIN_SECONDS",
                          defaults["shutdown_drain_seconds"].default))
    grace = float(env.get("SIDELIGHT_SHUTDOWN_GRACE_SECONDS",
                          defaults["shutdown_grace_seconds"].default))
    needed = prestop_seconds(c) + drain + grace
    period = pod["spec"]["terminationGracePeriodSeconds"]
    assert needed + 5 <= period <= needed + 30, (needed, period)
    assert all(prestop_seconds(other) < period for other in pod["spec"]["containers"])


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion from earlier variables of the same container."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def test_redis_has_a_password_that_sidelight_s_url_carries(overlay: list[Json],
                                                           tmp_path: Path) -> None:
    """The two containers' templates, expanded as the kubelet would with one Secret value,
    against a real redis-server: the URL authenticates, and no password is refused."""
    if not RedisProcess.available():
        pytest.skip("redis-server is not installed")
    redis_pod = one(overlay, "Deployment", "sidelight-redis")["spec"]["template"]
    sidelight = container(sidelight_pod(overlay), "sidelight")
    secret = "0123456789abcdef0123456789abcdef"
    for c in (container(redis_pod, "redis"), sidelight):
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
        assert refs and all(r == {"name": "sidelight-redis", "key": "password"}
                            for r in refs.values())
    args = [expand(a, {"REDIS_PASSWORD": secret}) for a in container(redis_pod, "redis")["args"]]
    password = args[args.index("--requirepass") + 1]
    url = expand(env_of(sidelight)["SIDELIGHT_REDIS_URL"], {"REDIS_PASSWORD": secret})
    host, port = re.fullmatch(r"redis://:\w+@([\w.-]+):(\d+)/\d+", url).groups()  # type: ignore[union-attr]
    service = one(overlay, "Service", host)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert selects(service["spec"]["selector"], redis_pod["metadata"]["labels"])
    server = RedisProcess(tmp_path, password=password).start()
    try:
        local = url.replace(f"{host}:{port}", f"127.0.0.1:{server.port}")
        assert redis.Redis.from_url(local).ping() is True
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"redis://127.0.0.1:{server.port}/0").ping()
    finally:
        server.kill()


# ------------------------------------------------------------------ policies and autoscaling


def test_network_policies_open_only_the_named_ports_to_the_named_peers(
        overlay: list[Json]) -> None:
    sidelight = one(overlay, "NetworkPolicy", "sidelight")["spec"]
    pod = sidelight_pod(overlay)
    assert selects(sidelight["podSelector"]["matchLabels"], pod["metadata"]["labels"])
    assert sidelight["policyTypes"] == ["Ingress"]
    clients, prometheus = sidelight["ingress"]
    assert clients["from"] == [{"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"sidelight.dev/client": "true"}}}]
    assert prometheus["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "prometheus"}
    opened = {p["port"] for rule in sidelight["ingress"] for p in rule["ports"]}
    assert opened <= port_names(pod)
    assert "grpc" in {p["port"] for p in clients["ports"]}
    assert {p["port"] for p in prometheus["ports"]} <= {"metrics", "triton-metrics"}
    redis_policy = one(overlay, "NetworkPolicy", "sidelight-redis")["spec"]
    redis_pod = one(overlay, "Deployment", "sidelight-redis")["spec"]["template"]
    assert selects(redis_policy["podSelector"]["matchLabels"], redis_pod["metadata"]["labels"])
    assert redis_policy["policyTypes"] == ["Ingress", "Egress"] and "egress" not in redis_policy
    (rule,) = redis_policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == ["redis"]
    allowed = [p for p in pods(overlay)
               if selects(rule["from"][0]["podSelector"]["matchLabels"], p["metadata"]["labels"])]
    assert allowed == [pod]


def test_the_autoscaler_and_disruption_budget_cover_the_sidelight_deployment(
        overlay: list[Json]) -> None:
    pod = sidelight_pod(overlay)
    (deployment,) = [d for d in objects_of(overlay, "Deployment") if d["spec"]["template"] is pod]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns them
    hpa = one(overlay, "HorizontalPodAutoscaler", "sidelight")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    watched = [m["containerResource"]["container"] for m in hpa["metrics"]]
    assert "sidelight" in watched and set(watched) <= set(names(pod["spec"]["containers"]))
    pdb = one(overlay, "PodDisruptionBudget", "sidelight")["spec"]
    assert selects(pdb["selector"]["matchLabels"], pod["metadata"]["labels"])
    assert pdb["maxUnavailable"] < hpa["minReplicas"]


def exported_metric_names() -> set[str]:
    """Every series name a fresh server exports (counters with their _total)."""
    metrics = Metrics(CollectorRegistry())
    metrics.initialise(["m"], ["exact"])
    return {s.name for family in metrics.registry.collect() for s in family.samples}


@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_keda_replaces_the_hpa_and_queries_metrics_sidelight_exports(overlay_name: str) -> None:
    if KUSTOMIZE is None:
        pytest.skip("no kustomize v4+ (make install)")
    objects = build(overlay_name, ("monitoring", "keda"))
    assert not objects_of(objects, "HorizontalPodAutoscaler")
    scaled = one(objects, "ScaledObject", "sidelight")["spec"]
    target = scaled["scaleTargetRef"]
    deployment = one(objects, "Deployment", target["name"])
    assert target["kind"] == "Deployment" and "sidelight" in names(
        deployment["spec"]["template"]["spec"]["containers"])
    queries = [t["metadata"]["query"] for t in scaled["triggers"] if t["type"] == "prometheus"]
    used = {m for q in queries for m in re.findall(r"sidelight_\w+", q)}
    assert used == {"sidelight_explain_in_flight", "sidelight_explain_rejected_total"}
    assert used <= exported_metric_names()
    job = one(objects, "ServiceMonitor", "sidelight")["spec"]["selector"]["matchLabels"]
    assert all('job="sidelight"' in q for q in queries) and one(objects, "Service", "sidelight")
    cpu = next(t for t in scaled["triggers"] if t["type"] == "cpu")["metadata"]
    assert cpu["containerName"] == "sidelight" and job


# -------------------------------------------------------------------------------- monitoring


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_generate", DEPLOY / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_files_match_the_generator() -> None:
    for path, text in generator().outputs().items():
        assert path.read_text() == text, f"{path} is stale: run python deploy/generate.py"


def test_every_yaml_file_under_deploy_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 20
    for path in files:
        assert [d for d in yaml.safe_load_all(path.read_text()) if d is not None], path
    json.loads((DEPLOY / "grafana" / "sidelight.json").read_text())


@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_monitoring_scrapes_the_metrics_port_with_the_labels_prometheus_selects(
        overlay_name: str) -> None:
    if KUSTOMIZE is None:
        pytest.skip("no kustomize v4+ (make install)")
    objects = build(overlay_name, ("monitoring",))
    monitor = one(objects, "ServiceMonitor", "sidelight")
    scraped = [s for s in objects_of(objects, "Service")
               if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
               and "metrics" in {p["name"] for p in s["spec"]["ports"]}]
    assert [s["metadata"]["name"] for s in scraped] == ["sidelight"]  # the job label
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}
    rule = one(objects, "PrometheusRule", "sidelight")
    for o in (monitor, rule):
        assert o["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    assert rule["spec"]["groups"] == rules
    board = one(objects, "ConfigMap", "sidelight-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["sidelight.json"]) == json.loads(
        (DEPLOY / "grafana" / "sidelight.json").read_text())


@pytest.fixture
def overlay_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def test_the_prometheus_selector_label_is_set_by_an_overlay(overlay_dir: Path) -> None:
    if KUSTOMIZE is None:
        pytest.skip("no kustomize v4+ (make install)")
    rel = os.path.relpath(K8S, overlay_dir)
    (overlay_dir / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [f"{rel}/overlays/standalone"],
        "components": [f"{rel}/components/monitoring"],
        "patches": [{"target": {"group": "monitoring.coreos.com"}, "patch": yaml.safe_dump([
            {"op": "replace", "path": "/metadata/labels/release", "value": "prom"}])}]}))
    done = subprocess.run([*KUSTOMIZE, str(overlay_dir)], capture_output=True, text=True,
                          timeout=60, check=True)
    labels = [d["metadata"]["labels"] for d in yaml.safe_load_all(done.stdout)
              if d and d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert len(labels) == 2 and all(x["release"] == "prom" for x in labels)


def test_dashboard_follows_grafanas_schema() -> None:
    board = json.loads((DEPLOY / "grafana" / "sidelight.json").read_text())
    (source,) = board["__inputs"]
    assert source["type"] == "datasource" and source["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "namespace", "model"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == f"${{{source['name']}}}"
    for name in ("job", "namespace"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    assert variables["model"]["query"]["query"].startswith("label_values(")
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"])
            assert p["datasource"]["uid"] == "${datasource}"
    kinds = {p["type"] for p in panels}
    assert {"timeseries", "heatmap", "stat", "row"} <= kinds
    assert {r["id"] for r in board["__requires"] if r["type"] == "panel"} == kinds - {"row"}


def test_every_dashboard_selector_is_scoped_to_one_job_and_namespace() -> None:
    """Several deployments in one Prometheus are never summed: every series selector of every
    panel and of the model picker carries the job and namespace variables."""
    board = json.loads((DEPLOY / "grafana" / "sidelight.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs.append(next(v for v in board["templating"]["list"] if v["name"] == "model")[
        "query"]["query"])
    unscoped = [m.group(0) for e in exprs for m in re.finditer(r"sidelight_\w+(\{[^}]*\})?", e)
                if not {'job=~"$job"', 'namespace=~"$namespace"'} <= set(
                    (m.group(1) or "{}")[1:-1].split(", "))]
    assert not unscoped and len(exprs) >= 25, unscoped


# --------------------------------------------------------------------------- compose, Grafana


def test_compose_builds_the_repository_and_mounts_files_that_exist() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(services) == {"sidelight", "redis", "prometheus", "grafana"}
    build_ = services["sidelight"]["build"]
    assert (COMPOSE.parent / build_["context"] / build_["dockerfile"]).resolve() == (
        ROOT / "Dockerfile")
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
    env = services["sidelight"]["environment"]
    known = {f"SIDELIGHT_{n.upper()}" for n in Settings.model_fields}
    dockerfile = re.findall(r"(SIDELIGHT_\w+)=", (ROOT / "Dockerfile").read_text())
    assert {n for n in [*env, *dockerfile] if n.startswith("SIDELIGHT_")} <= known
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    target = scrape["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == f"sidelight:{env['SIDELIGHT_METRICS_PORT']}"


def test_compose_runs_like_the_manifests_read_only_with_a_redis_password() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    sidelight, redis_ = services["sidelight"], services["redis"]
    assert sidelight["read_only"] is True and sidelight["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in sidelight["security_opt"]
    assert any(t.split(":")[0] == "/tmp" for t in sidelight["tmpfs"])
    password = redis_["command"][redis_["command"].index("--requirepass") + 1]
    assert password.startswith("${REDIS_PASSWORD")
    url = sidelight["environment"]["SIDELIGHT_REDIS_URL"]
    assert url == f"redis://:{password}@redis:6379/0"
    assert "ports" not in redis_  # reachable from the compose network only


def test_grafana_provisioning_points_at_the_mounted_dashboard() -> None:
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" /
                               "sidelight.yml").read_text())["providers"][0]
    assert mounts["../grafana/sidelight.json"].startswith(provider["options"]["path"] + "/")
    source = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" /
                             "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"].startswith("http://prometheus:")
