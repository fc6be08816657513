"""The Helm chart (deploy/helm/portico-push): lint, render, validate, and what it promises.

`helm lint --strict`, then `helm template` with the defaults and with every option on
(`ci/all-enabled-values.yaml`), each object validated against the Kubernetes schemas
(kubernetes-validate; the Prometheus Operator's kinds are CRDs and only checked for shape).
helm is the project's pinned, integrity-checked binary (`tests/support/kubetools.py`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.fetcher import shutdown as fetcher_shutdown
from services.gateway.shutdown import grace_period_seconds
from tests.support import kubetools

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "portico-push"
ALL_ENABLED = CHART / "ci" / "all-enabled-values.yaml"
KUBERNETES_VERSION = "1.33.0"
OPERATOR_KINDS = {"PodMonitor", "PrometheusRule"}


def helm() -> str:
    try:
        return str(kubetools.tool("helm"))
    except kubetools.ToolsUnavailable as exc:
        pytest.skip(str(exc))


def template(*args: str) -> list[dict]:
    result = subprocess.run(
        [helm(), "template", "portico-push", str(CHART), "--namespace", "portico-push", *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def refused(*args: str) -> str:
    result = subprocess.run([helm(), "template", "x", str(CHART), *args], capture_output=True, text=True)
    assert result.returncode != 0, f"accepted: {args}"
    return result.stderr


def one(objects: list[dict], kind: str, name: str) -> dict:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_ENABLED)]], ids=["defaults", "all-enabled"])
def test_lint_strict_is_clean(values: list[str]):
    result = subprocess.run([helm(), "lint", "--strict", str(CHART), *values], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_ENABLED)]], ids=["defaults", "all-enabled"])
def test_every_rendered_object_validates(values: list[str]):
    objects = template(*values)
    for obj in objects:
        if obj["kind"] in OPERATOR_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["spec"]
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    kinds = {o["kind"] for o in objects}
    if values:
        assert {
            "Ingress",
            "NetworkPolicy",
            "PodMonitor",
            "PrometheusRule",
            "HorizontalPodAutoscaler",
        } <= kinds
    else:
        assert not kinds & (OPERATOR_KINDS | {"NetworkPolicy", "Ingress", "Secret"}), (
            "a plain cluster's chart"
        )


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "gateway.replicas=abc"],
        ["--set", "fetcher.shards=0"],
        ["--set", "image.pullPolicy=Sometimes"],
        ["--set-string", "ingress.enabled=yes"],
        ["--set", "gatway.replicas=2"],  # a typo: unknown keys are refused, not ignored
        ["--set", "config.logLevel=LOUD"],
        ["--set", "config.allowedOrigins={booking.example.org}"],
        ["--set", "networkPolicy.egressPorts.redis={70000}"],
        ["--set", "redis.urlSecret.name="],
    ],
)
def test_the_values_schema_rejects_wrong_types(args: list[str]):
    assert "values don't meet the specifications of the schema" in refused(*args)


def test_an_ingress_needs_its_host():
    assert "ingress.host is required" in refused("--set", "ingress.enabled=true")


@pytest.mark.parametrize("drain", [20, 60])
def test_grace_periods_are_derived_from_the_drain_settings(drain: int):
    objects = template("--set", f"gateway.drainSeconds={drain}", "--set", "gateway.preStopSeconds=5")
    gateway = one(objects, "Deployment", "portico-push-gateway")["spec"]["template"]["spec"]
    assert gateway["terminationGracePeriodSeconds"] >= grace_period_seconds(drain, 5)
    assert gateway["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"] == 5
    config = one(objects, "ConfigMap", "portico-push-config")["data"]
    assert float(config["DRAIN_SECONDS"]) == drain
    fetcher = one(objects, "Deployment", "portico-push-fetcher")["spec"]["template"]["spec"]
    assert fetcher["terminationGracePeriodSeconds"] >= fetcher_shutdown.grace_period_seconds()


def test_pods_are_non_root_read_only_probed_and_roll_on_a_config_change():
    objects = template()
    checksums = []
    for name in ("portico-push-gateway", "portico-push-fetcher"):
        pod = one(objects, "Deployment", name)["spec"]["template"]
        spec, container = pod["spec"], pod["spec"]["containers"][0]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["resources"]["requests"] and container["resources"]["limits"]
        checksums.append(pod["metadata"]["annotations"]["checksum/config"])
    changed = template("--set", "config.logLevel=DEBUG")
    pod = one(changed, "Deployment", "portico-push-gateway")["spec"]["template"]
    assert pod["metadata"]["annotations"]["checksum/config"] != checksums[0], (
        "a settings change rolls the pods"
    )


def test_secrets_are_referenced_never_defaulted():
    objects = template("-f", str(ALL_ENABLED))
    assert not [o for o in objects if o["kind"] == "Secret"]
    fetcher = one(objects, "Deployment", "portico-push-fetcher")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in fetcher["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "portico-push-secrets",
        "key": "DATABASE_URL",
    }
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_URL"
    rendered = json.dumps(objects)
    assert "change-me" not in rendered and "postgresql://" not in rendered and "redis://" not in rendered


SENTINEL = [
    "--set", "redis.mode=sentinel",
    "--set", "redis.sentinel.addresses={redis-sentinel-0.redis-sentinel:26379,redis-sentinel-1.redis-sentinel:26379}",
    "--set", "redis.sentinel.masterName=portico",
    "--set", "redis.sentinel.passwordSecret.name=redis-auth",
    "--set", "redis.sentinel.passwordSecret.key=SENTINEL_PASSWORD",
    "--set", "redis.passwordSecret.name=redis-auth",
    "--set", "redis.passwordSecret.key=PASSWORD",
]  # fmt: skip
CLUSTER = ["--set", "redis.mode=cluster", "--set", "redis.cluster.nodes={redis-cluster-0.redis-cluster:6379}"]


@pytest.mark.parametrize(("mode", "args"), [("sentinel", SENTINEL), ("cluster", CLUSTER)])
def test_redis_can_be_one_node_sentinel_or_a_cluster(mode: str, args: list[str]):
    """The three ways the services find Redis (README, "Redis: one node, Sentinel or Cluster"):
    exactly one reaches the pods; addresses in the ConfigMap, passwords from Secrets."""
    objects = template(*args)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    config = one(objects, "ConfigMap", "portico-push-config")["data"]
    for name in ("portico-push-gateway", "portico-push-fetcher"):
        container = one(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert "REDIS_URL" not in env, "REDIS_URL must not sit behind Sentinel or a Cluster"
        if mode == "sentinel":
            assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                "name": "redis-auth",
                "key": "PASSWORD",
            }
            assert env["REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "SENTINEL_PASSWORD"
    if mode == "sentinel":
        assert config["REDIS_SENTINELS"].count(":26379") == 2 and config["REDIS_SENTINEL_MASTER"] == "portico"
        assert "REDIS_CLUSTER_NODES" not in config
    else:
        assert config["REDIS_CLUSTER_NODES"] == "redis-cluster-0.redis-cluster:6379"
        assert "REDIS_SENTINELS" not in config
    node = template()
    assert not {"REDIS_SENTINELS", "REDIS_CLUSTER_NODES"} & set(
        one(node, "ConfigMap", "portico-push-config")["data"]
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "redis.mode=replicated"],
        ["--set", "redis.mode=sentinel"],  # no sentinels, no master name
        ["--set", "redis.mode=sentinel", "--set", "redis.sentinel.addresses={s:26379}"],
        ["--set", "redis.mode=cluster"],
        ["--set", "redis.mode=cluster", "--set", "redis.cluster.nodes={redis-0}"],  # no port
    ],
)
def test_an_incomplete_redis_topology_is_refused(args: list[str]):
    assert "values don't meet the specifications of the schema" in refused(*args)


def test_images_come_from_the_registry_and_tag_values():
    objects = template("--set", "image.registry=registry.example.org/portico/", "--set", "image.tag=1.2.3")
    images = {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]["containers"][0]["image"]
        for o in objects
        if o["kind"] == "Deployment"
    }
    assert images == {
        "portico-push-gateway": "registry.example.org/portico/portico-push-gateway:1.2.3",
        "portico-push-fetcher": "registry.example.org/portico/portico-push-fetcher:1.2.3",
    }
    bare = template("--set", "image.registry=")
    assert {
        o["spec"]["template"]["spec"]["containers"][0]["image"] for o in bare if o["kind"] == "Deployment"
    } == {
        "portico-push-gateway:0.1.0",
        "portico-push-fetcher:0.1.0",
    }, "appVersion by default; bare names for a kind/minikube cluster"


def test_only_the_socketio_paths_have_affinity_and_on_a_service_of_their_own():
    objects = template("-f", str(ALL_ENABLED))
    raw = one(objects, "Ingress", "portico-push-gateway")
    socketio = one(objects, "Ingress", "portico-push-gateway-socketio")
    assert not any("affinity" in key for key in raw["metadata"]["annotations"])
    notes = socketio["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert notes["nginx.ingress.kubernetes.io/session-cookie-change-on-failure"] == "true"
    assert notes["cert-manager.io/cluster-issuer"] == "letsencrypt", "the user's annotations are kept"
    backends = {
        p["backend"]["service"]["name"] for r in socketio["spec"]["rules"] for p in r["http"]["paths"]
    }
    assert backends == {"portico-push-gateway-socketio"}
    for ingress in (raw, socketio):
        assert ingress["spec"]["tls"] == [
            {"hosts": ["booking.example.org"], "secretName": "booking-example-org-tls"}
        ]
    config = one(objects, "ConfigMap", "portico-push-config")["data"]
    assert config["ALLOWED_ORIGINS"] == "https://booking.example.org"
    only_host = template("--set", "ingress.enabled=true", "--set", "ingress.host=shop.example.org")
    config = one(only_host, "ConfigMap", "portico-push-config")["data"]
    assert config["ALLOWED_ORIGINS"] == "https://shop.example.org", "the origin follows the host by default"


def test_network_policy_admits_the_namespaces_and_ports_of_its_values():
    objects = template(
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.ingressControllerNamespaces={traefik}",
        "--set",
        "networkPolicy.egressPorts.postgres={6432}",
    )
    gateway = one(objects, "NetworkPolicy", "portico-push-gateway")
    admitted = [
        f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for f in gateway["spec"]["ingress"][0]["from"]
    ]
    assert admitted == ["traefik", "monitoring"]
    fetcher = one(objects, "NetworkPolicy", "portico-push-fetcher")
    ports = [p["port"] for p in fetcher["spec"]["egress"][0]["ports"]]
    assert ports == [6379, 26379, 6432]


def test_the_charts_copies_of_the_alerts_and_dashboard_are_the_sources():
    observability = ROOT / "deploy" / "k8s" / "base" / "observability"
    assert (CHART / "files" / "alerts.yml").read_text() == (observability / "alerts.yml").read_text()
    assert (CHART / "files" / "grafana-dashboard.json").read_text() == (
        observability / "grafana-dashboard.json"
    ).read_text()
    rule = one(template("-f", str(ALL_ENABLED)), "PrometheusRule", "portico-push")
    assert rule["spec"] == yaml.safe_load((observability / "alerts.yml").read_text())
