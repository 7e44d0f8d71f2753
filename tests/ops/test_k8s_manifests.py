"""deploy/k8s: every overlay renders with ``kubectl kustomize``, validates against the Kubernetes schemas
(kubernetes-validate, strict, offline), passes checkov with only explained skips, monitors what the
compose stack monitors (the same rules and dashboards), and wires its parts together as intended:
NetworkPolicy, probes, Secret references, monitors, the gateway's settings. No cluster needed.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu-trial", "gpu-production")
DEPLOY_JOB = K8S / "jobs" / "slsg-deploy.yaml"
# Kubernetes versions the manifests must be valid for: an older supported one and the newest the package knows
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
OPERATOR_GROUP = "monitoring.coreos.com/"  # Prometheus Operator kinds: no schema in kubernetes-validate
KUBECTL = shutil.which("kubectl")
RELEASED_IMAGE = "registry.example.com/slsg-gateway:0.1.0"
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with Kustomize) is not installed")


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    proc = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def deploy_job(model: str = "tray", version: str = "3") -> dict:
    """The deploy Job as the file's header (and docs/operations.md) creates it: kubectl set env, set image
    (``--local``: no cluster), created in the stack's namespace."""
    env = subprocess.run([KUBECTL, "set", "env", "--local", "-f", str(DEPLOY_JOB), f"MODEL={model}",
                          f"VERSION={version}", "-o", "yaml"], capture_output=True, text=True, timeout=60)
    assert env.returncode == 0, env.stderr
    image = subprocess.run([KUBECTL, "set", "image", "--local", "-f", "-", f"slsg={RELEASED_IMAGE}", "-o", "yaml"],
                           input=env.stdout, capture_output=True, text=True, timeout=60)
    assert image.returncode == 0, image.stderr
    job = yaml.safe_load(image.stdout)
    job["metadata"]["namespace"] = "slsg"  # kubectl -n slsg create -f -
    return job


def objects(overlay: str, kind: str) -> list[dict]:
    return [o for o in render(overlay) if o["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict:
    found = [o for o in objects(overlay, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels only, as these manifests use) matches ``labels``."""
    assert set(selector) <= {"matchLabels"}, f"unexpected selector form {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def pod_labels(overlay: str, name: str) -> dict:
    return one(overlay, "Deployment", name)["spec"]["template"]["metadata"]["labels"]


def container(overlay: str, name: str) -> dict:
    (only,) = one(overlay, "Deployment", name)["spec"]["template"]["spec"]["containers"]
    return only


# -- rendering and schemas ------------------------------------------------------------------------------------

@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_its_namespace_with_released_images(overlay):
    rendered = render(overlay)
    (namespace,) = [o for o in rendered if o["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace["metadata"]["name"], obj["metadata"]["name"]
    images = [c["image"] for d in objects(overlay, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]]
    assert images and all(":" in image and not image.endswith(":latest") for image in images), images
    assert not objects(overlay, "Secret"), "secrets are referenced, never committed"


@needs_kubectl
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schema(overlay, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    without_schema = set()
    for obj in (*render(overlay), deploy_job()):
        if obj["apiVersion"].startswith(OPERATOR_GROUP):
            # custom resources: kubernetes-validate has no schema for them; their wiring is checked below
            without_schema.add(obj["kind"])
            continue
        kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError naming the field
    assert without_schema <= {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


@needs_kubectl
def test_schema_validation_catches_a_misspelt_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    gateway = json.loads(json.dumps(one("gpu-production", "Deployment", "slsg-gateway")))
    gateway["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, KUBERNETES_VERSIONS[-1], strict=True)


# -- security scan ------------------------------------------------------------------------------------------

def checkov_binary() -> str | None:
    local = ROOT / ".venv" / "checkov" / "bin" / "checkov"  # `make checkov`: its own venv (its pins clash)
    return str(local) if local.exists() else shutil.which("checkov")


def run_checkov(path: Path) -> dict:
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    proc = subprocess.run([checkov_binary(), "--compact", "--skip-download", "--framework", "kubernetes",
                           "-o", "json", "-f", str(path)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode in (0, 1), f"checkov did not run:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    return report[0] if isinstance(report, list) else report


@pytest.mark.slow  # checkov's scan: about 20 s
@needs_kubectl
@pytest.mark.skipif(checkov_binary() is None, reason="checkov is not installed (make checkov)")
def test_checkov_finds_nothing_unexplained(tmp_path):
    manifests = tmp_path / "manifests.yaml"
    docs = [*render("cpu-trial"), *render("gpu-production"), deploy_job()]
    manifests.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    report = run_checkov(manifests)
    results = report.get("results", {})
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in results.get("failed_checks", [])]
    assert not failed, "checkov failures:\n" + "\n".join(failed)
    skipped = results.get("skipped_checks", [])
    passed = {c["check_id"] for c in results.get("passed_checks", [])}
    assert {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_22", "CKV_K8S_28"} <= passed  # it really scanned the workloads
    for check in skipped:
        assert len(check.get("check_result", {}).get("suppress_comment", "")) > 20, f"unexplained skip: {check}"
    assert {c["check_id"] for c in skipped} == {"CKV_K8S_43", "CKV_K8S_40", "CKV_K8S_35"}


# -- one source for rules and dashboards -------------------------------------------------------------------

def compose_rule_groups() -> list[dict]:
    rule_files = sorted((ROOT / "docker" / "prometheus" / "rules").glob("*.yml"))
    return [group for path in rule_files for group in yaml.safe_load(path.read_text())["groups"]]


@needs_kubectl
def test_prometheus_rules_equal_the_compose_rule_files():
    rendered = [g for rule in objects("gpu-production", "PrometheusRule") for g in rule["spec"]["groups"]]
    assert sorted(rendered, key=lambda g: g["name"]) == sorted(compose_rule_groups(), key=lambda g: g["name"])


@needs_kubectl
def test_cpu_trial_rules_are_the_compose_rules_without_the_triton_alert():
    rendered = [g for rule in objects("cpu-trial", "PrometheusRule") for g in rule["spec"]["groups"]]
    expected = compose_rule_groups()
    for group in expected:
        group["rules"] = [r for r in group["rules"] if r.get("alert") != "TritonNotReady"]
    assert sorted(rendered, key=lambda g: g["name"]) == sorted(expected, key=lambda g: g["name"])


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboards_are_the_compose_dashboards(overlay):
    sources = {p.name: p.read_text() for p in (ROOT / "docker" / "grafana" / "dashboards").glob("*.json")}
    rendered = {}
    for config_map in objects(overlay, "ConfigMap"):
        if config_map["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            rendered |= config_map["data"]
    assert rendered == sources
    (datasource,) = [c for c in objects(overlay, "ConfigMap")
                     if "grafana_datasource" in c["metadata"].get("labels", {})]
    uids = {d["uid"] for d in yaml.safe_load(next(iter(datasource["data"].values())))["datasources"]}
    assert uids == {"slsg-prometheus"}  # the uid every dashboard panel queries
    assert all('"uid": "slsg-prometheus"' in text for text in sources.values())


def test_generated_monitoring_files_are_current():
    proc = subprocess.run([sys.executable, str(K8S / "generate.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_generator_check_notices_a_changed_rule_file(tmp_path):
    for part in ("deploy/k8s", "docker/prometheus/rules", "docker/grafana/dashboards"):
        shutil.copytree(ROOT / part, tmp_path / part)
    rules = tmp_path / "docker/prometheus/rules/slsg_alerts.yml"
    rules.write_text(rules.read_text().replace("for: 1m", "for: 2m", 1))
    generator = tmp_path / "deploy/k8s/generate.py"
    proc = subprocess.run([sys.executable, str(generator), "--check"], capture_output=True, text=True)
    assert proc.returncode == 1 and "prometheus-rule-slsg-alerts.yaml: differs from its source" in proc.stderr
    assert subprocess.run([sys.executable, str(generator)], capture_output=True).returncode == 0
    assert subprocess.run([sys.executable, str(generator), "--check"], capture_output=True).returncode == 0


# -- wiring ---------------------------------------------------------------------------------------------------

@needs_kubectl
def test_network_policy_lets_only_gateways_reach_triton():
    overlay = "gpu-production"
    triton, gateway = pod_labels(overlay, "slsg-triton"), pod_labels(overlay, "slsg-gateway")
    policies = objects(overlay, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in p["spec"]
               for p in policies), "no default deny of ingress"
    on_triton = [p for p in policies if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], triton)]
    assert len(on_triton) == 1
    api_ports = {c["containerPort"] for c in container(overlay, "slsg-triton")["ports"] if c["name"] != "metrics"}
    for rule in on_triton[0]["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        sources = rule["from"]
        if ports & api_ports:  # the APIs that load and unload models: gateway pods of this namespace only
            assert ports == api_ports
            assert all(set(s) == {"podSelector"} and selects(s["podSelector"], gateway) for s in sources)
            assert not any(selects(s["podSelector"], triton) for s in sources)
        else:  # Prometheus, from the monitoring namespace, on the metrics port only
            assert ports == {8002} and all(set(s) == {"namespaceSelector"} for s in sources)
    service = one(overlay, "Service", "slsg-triton")
    assert selects({"matchLabels": service["spec"]["selector"]}, triton)


@needs_kubectl
def test_triton_gets_a_gpu_per_pod_and_the_gateway_reaches_it_over_grpc():
    overlay = "gpu-production"
    triton = container(overlay, "slsg-triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1" == triton["resources"]["requests"]["nvidia.com/gpu"]
    assert "--model-control-mode=explicit" in triton["args"]
    assert one(overlay, "Deployment", "slsg-triton")["spec"]["replicas"] == 2
    settings = gateway_environment(overlay)
    host, port = settings["SLSG_TRITON_URL"].split(":")
    service = one(overlay, "Service", host)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == int(port)
    assert settings["SLSG_BACKEND"] == "triton" and settings["SLSG_TRITON_PROTOCOL"] == "grpc"


@needs_kubectl
def test_cpu_trial_runs_the_models_in_the_gateway_without_any_gpu():
    rendered = render("cpu-trial")
    assert "nvidia.com/gpu" not in json.dumps(rendered)
    assert [d["metadata"]["name"] for d in objects("cpu-trial", "Deployment")] == ["slsg-gateway"]
    assert gateway_environment("cpu-trial")["SLSG_BACKEND"] == "embedded"


def gateway_environment(overlay: str) -> dict[str, str]:
    """The gateway container's SLSG_* variables: its ConfigMap, then its own env (secret refs as placeholders)."""
    gateway = container(overlay, "slsg-gateway")
    env: dict[str, str] = {}
    for source in gateway["envFrom"]:
        env |= one(overlay, "ConfigMap", source["configMapRef"]["name"])["data"]
    for var in gateway["env"]:
        env[var["name"]] = var.get("value", "key-from-secret")
    return env


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_environment_is_valid_gateway_settings(overlay, monkeypatch):
    from slsg_gateway.settings import Settings

    env = gateway_environment(overlay)
    for name in [n for n in os.environ if n.startswith("SLSG_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    mounts = {m["name"]: m for m in container(overlay, "slsg-gateway")["volumeMounts"]}
    assert str(settings.desired_state_root()) == mounts["models"]["mountPath"] and mounts["models"]["readOnly"]
    assert settings.reconcile_interval_s > 0 and settings.workers == 1
    assert settings.port == container(overlay, "slsg-gateway")["ports"][0]["containerPort"]
    env_vars = container(overlay, "slsg-gateway")["env"]
    refs = {v["valueFrom"]["secretKeyRef"]["name"] for v in env_vars if "valueFrom" in v}
    assert refs == {"slsg-gateway-keys"}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_real_health_endpoints(overlay):
    from slsg_gateway.app import create_app
    from slsg_gateway.settings import Settings

    routes = set(create_app(Settings(repository=Path("absent"))).openapi()["paths"])
    probes = {"slsg-gateway": ("/healthz", "/readyz"), "slsg-triton": ("/v2/health/live", "/v2/health/ready")}
    for deployment in objects(overlay, "Deployment"):
        name = deployment["metadata"]["name"]
        spec = container(overlay, name)
        ports = {p["name"] for p in spec["ports"]}
        live, ready = spec["livenessProbe"]["httpGet"], spec["readinessProbe"]["httpGet"]
        assert (live["path"], ready["path"]) == probes[name]
        assert {live["port"], ready["port"]} <= ports
        if name == "slsg-gateway":
            assert {live["path"], ready["path"]} <= routes


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitors_select_the_pods_and_ports_that_serve_metrics_as_the_compose_jobs(overlay):
    compose_jobs = {j["job_name"] for j in yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
                    ["scrape_configs"]}
    (service_monitor,) = objects(overlay, "ServiceMonitor")
    service = one(overlay, "Service", "slsg-gateway")
    assert selects(service_monitor["spec"]["selector"], service["metadata"]["labels"])
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    jobs = {endpoint["relabelings"][0]["replacement"]}
    for pod_monitor in objects(overlay, "PodMonitor"):
        assert selects(pod_monitor["spec"]["selector"], pod_labels(overlay, "slsg-triton"))
        (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in {p["name"] for p in container(overlay, "slsg-triton")["ports"]}
        jobs.add(endpoint["relabelings"][0]["replacement"])
    assert jobs <= compose_jobs and "slsg-gateway" in jobs


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_budgets_and_autoscaler_point_at_the_deployments(overlay):
    for budget in objects(overlay, "PodDisruptionBudget"):
        name = budget["metadata"]["name"]
        assert selects(budget["spec"]["selector"], pod_labels(overlay, name))
    (hpa,) = objects(overlay, "HorizontalPodAutoscaler")
    target = one(overlay, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
    assert "replicas" not in target["spec"], "the autoscaler owns the gateway's replica count"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert "requests" in container(overlay, target["metadata"]["name"])["resources"]  # CPU utilisation needs them


@needs_kubectl
def test_deploy_job_runs_slsg_deploy_on_the_model_volume():
    job = deploy_job("tray", "3")
    spec = job["spec"]["template"]["spec"]
    (slsg,) = spec["containers"]
    env = {v["name"]: v["value"] for v in slsg["env"]}
    assert env == {"MODEL": "tray", "VERSION": "3"}
    assert slsg["args"][:4] == ["deploy", "$(MODEL)", "--version", "$(VERSION)"]
    repository = slsg["args"][slsg["args"].index("--repository") + 1]
    (mount,) = slsg["volumeMounts"]
    assert mount["mountPath"] == repository and not mount.get("readOnly")
    (volume,) = spec["volumes"]
    claim = one("gpu-production", "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
