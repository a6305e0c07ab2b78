"""deploy/ checked offline (no Docker or kubectl here): every manifest parses, every reference
resolves (kustomize resources, labels and selectors, ports, volumes, claims, settings, compose
mounts), and the generated dashboard and monitoring manifests match their generator."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from service.config import Settings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
BASE, MONITORING = DEPLOY / "k8s" / "base", DEPLOY / "k8s" / "monitoring"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
Json = dict[str, Any]


def documents(path: Path) -> list[Json]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomize(directory: Path) -> list[Json]:
    """The objects `kubectl apply -k directory` would create (resources only, no patches)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    out: list[Json] = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml lists missing {resource}"
        out.extend(kustomize(path) if path.is_dir() else documents(path))
    return out


def one(objects: list[Json], kind: str, name: str) -> Json:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_generate", DEPLOY / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_yaml_file_under_deploy_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 10
    for path in files:
        assert documents(path), f"{path} is empty"
    json.loads((DEPLOY / "grafana" / "sidelight.json").read_text())


def test_generated_files_match_the_generator() -> None:
    for path, text in generator().outputs().items():
        assert path.read_text() == text, f"{path} is stale: run python deploy/generate.py"


def test_base_deployment_runs_the_sidecar_as_the_issue_describes() -> None:
    objects = kustomize(BASE)
    pod = one(objects, "Deployment", "sidelight")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    images = yaml.safe_load((BASE / "kustomization.yaml").read_text())["images"]
    assert container["image"] in {i["name"] for i in images}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090}
    exposed = re.search(r"^EXPOSE (.+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert exposed and set(map(int, exposed.group(1).split())) == set(ports.values())
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    assert {"requests", "limits"} <= set(container["resources"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SIDELIGHT_PORT"] == "50051" and env["SIDELIGHT_METRICS_PORT"] == "9090"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == env["SIDELIGHT_METRICS_PORT"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env[
        "SIDELIGHT_MODELS_DIR"])
    assert mount["readOnly"] is True
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_every_sidelight_variable_is_a_setting() -> None:
    known = {f"SIDELIGHT_{name.upper()}" for name in Settings.model_fields}
    container = one(kustomize(BASE), "Deployment", "sidelight")["spec"]["template"]["spec"][
        "containers"][0]
    names = [e["name"] for e in container["env"]]
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["sidelight"]["environment"]
    dockerfile = re.findall(r"(SIDELIGHT_\w+)=", (ROOT / "Dockerfile").read_text())
    unknown = {n for n in [*names, *compose, *dockerfile] if n.startswith("SIDELIGHT_")} - known
    assert not unknown, f"not settings: {unknown}"


def test_redis_url_names_the_redis_service() -> None:
    objects = kustomize(BASE)
    container = one(objects, "Deployment", "sidelight")["spec"]["template"]["spec"][
        "containers"][0]
    url = next(e["value"] for e in container["env"] if e["name"] == "SIDELIGHT_REDIS_URL")
    host, port = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", url).groups()  # type: ignore[union-attr]
    service = one(objects, "Service", host)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    redis = one(objects, "Deployment", host)
    assert selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    claim = redis["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    one(objects, "PersistentVolumeClaim", claim)


@pytest.mark.parametrize("directory", [BASE, MONITORING])
def test_services_select_pods_and_name_their_ports(directory: Path) -> None:
    objects = kustomize(directory)
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    for service in (o for o in objects if o["kind"] == "Service"):
        pods = [d["spec"]["template"] for d in deployments
                if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"][
                    "labels"])]
        assert len(pods) == 1, f"Service {service['metadata']['name']} selects {len(pods)}"
        named = {p["name"] for c in pods[0]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named
    for d in deployments:
        assert selects(d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"][
            "labels"])


def test_monitoring_overlay_scrapes_the_metrics_port_and_carries_rules_and_dashboard() -> None:
    objects = kustomize(MONITORING)
    monitor = one(objects, "ServiceMonitor", "sidelight")
    service = one(objects, "Service", "sidelight")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    rules = one(objects, "PrometheusRule", "sidelight")["spec"]["groups"]
    assert rules == yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    board = one(objects, "ConfigMap", "sidelight-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["sidelight.json"])["uid"] == "sidelight"


def test_compose_builds_the_repository_and_mounts_files_that_exist() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(services) == {"sidelight", "redis", "prometheus", "grafana"}
    build = services["sidelight"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
        ROOT / "Dockerfile")
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
    env = services["sidelight"]["environment"]
    assert env["SIDELIGHT_REDIS_URL"].startswith("redis://redis:")
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    target = scrape["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == f"sidelight:{env['SIDELIGHT_METRICS_PORT']}"


def test_grafana_provisioning_points_at_the_mounted_dashboard() -> None:
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" /
                               "sidelight.yml").read_text())["providers"][0]
    assert mounts["../grafana/sidelight.json"].startswith(provider["options"]["path"] + "/")
    source = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" /
                             "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"].startswith("http://prometheus:")


def test_dashboard_follows_grafanas_schema() -> None:
    board = json.loads((DEPLOY / "grafana" / "sidelight.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
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
