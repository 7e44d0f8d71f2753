"""The compose stack and the images as files: services, GPU reservations, wiring between the
containers, secrets only from the (git-ignored) .env, Dockerfiles that copy what exists, and
`docker compose config` where a compose client is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?")
_SECRET_NAME = re.compile(r"KEY|PASSWORD|SECRET|TOKEN")


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def service(name: str) -> dict:
    return compose()["services"][name]


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def mounts(name: str) -> dict[str, str]:
    """source -> container path of a service's volumes (short syntax; colons inside ${...} kept)."""
    return dict(re.split(r":(?![^{]*\})", volume)[:2] for volume in service(name).get("volumes", []))


def gpu_devices(name: str) -> list[dict]:
    return service(name)["deploy"]["resources"]["reservations"]["devices"]


def dockerfile_stages(path: Path) -> list[list[str]]:
    """Instructions per build stage, continuation lines joined."""
    stages: list[list[str]] = []
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_services_and_the_train_profile():
    services = compose()["services"]
    assert set(services) == {"triton", "gateway", "prometheus", "grafana", "trainer"}
    assert services["trainer"]["profiles"] == ["train"]
    assert all("profiles" not in s for n, s in services.items() if n != "trainer")


def test_triton_serves_the_repository_on_a_gpu_with_explicit_model_control():
    triton = service("triton")
    assert triton["image"].split(":-", 1)[1].startswith("nvcr.io/nvidia/tritonserver:")
    assert {"--model-control-mode=explicit", "--load-model=*", "--model-repository=/models"} <= set(triton["command"])
    assert any(target == "/models" for target in mounts("triton").values())
    for name in ("triton", "trainer"):
        (device,) = gpu_devices(name)
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    published = {port.rsplit(":", 1)[1] for port in triton["ports"]}
    assert published == {"8000", "8001", "8002"}
    assert triton["healthcheck"]["test"][1:] == ["bash", "/opt/slsg/healthcheck.sh", "8000"]
    assert mounts("triton")["./docker/triton/healthcheck.sh"] == "/opt/slsg/healthcheck.sh"


def test_gateway_uses_triton_and_waits_until_it_is_healthy():
    gateway = service("gateway")
    env = gateway["environment"]
    assert env["SLSG_BACKEND"] == "triton" and env["SLSG_TRITON_URL"] == "triton:8001"
    assert env["SLSG_HOST"] == "0.0.0.0" and str(env["SLSG_PORT"]) == "8000"
    assert gateway["depends_on"]["triton"]["condition"] == "service_healthy"
    assert gateway["build"]["dockerfile"] == "docker/gateway.Dockerfile"
    assert service("grafana")["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_prometheus_gets_the_config_folder_so_rule_paths_resolve_as_in_the_repository():
    prometheus = service("prometheus")
    (config_arg,) = [a for a in prometheus["command"] if a.startswith("--config.file=")]
    container_config = Path(config_arg.split("=", 1)[1])
    source = {target: src for src, target in mounts("prometheus").items()}[str(container_config.parent)]
    repo_config = ROOT / source / container_config.name
    config = yaml.safe_load(repo_config.read_text())
    for pattern in config["rule_files"]:
        assert not Path(pattern).is_absolute(), pattern
        assert sorted(repo_config.parent.glob(pattern)), f"{pattern} matches no rule file"
    # compose service names are what the DNS discovery in prometheus.yml looks up
    names = {n for job in config["scrape_configs"] for sd in job.get("dns_sd_configs", []) for n in sd["names"]}
    assert names == {"gateway", "triton"} and names <= set(compose()["services"])


def test_every_variable_is_in_env_example_and_required_ones_have_values():
    example = env_example()
    text = COMPOSE_FILE.read_text()
    used = {m["name"]: m["op"] for m in _INTERPOLATION.finditer(text)}
    assert set(used) - set(example) == set(), f"not in .env.example: {sorted(set(used) - set(example))}"
    required = {name for name, op in used.items() if op == ":?"}
    assert {"SLSG_API_KEYS", "SLSG_ADMIN_KEYS", "GRAFANA_ADMIN_PASSWORD"} <= required
    assert all(example[name] for name in required)


def test_secrets_come_only_from_the_environment():
    for name, svc in compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if _SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}.{key} must be a required ${{VAR}}"
    placeholders = {k: v for k, v in env_example().items() if _SECRET_NAME.search(k) and not k.endswith("_USER")}
    assert placeholders and all(v.startswith("change-me") for v in placeholders.values()), placeholders


def test_the_env_file_is_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True, timeout=10)
    assert result.returncode == 0, ".env (API keys, Grafana password) must be listed in .gitignore"


def test_bind_mounted_files_exist():
    for name in compose()["services"]:
        for source in mounts(name):
            if source.startswith("./docker"):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"


@pytest.mark.parametrize("image", ["gateway", "trainer"])
def test_dockerfile_copies_existing_sources_its_dockerignore_keeps(image):
    dockerfile = ROOT / "docker" / f"{image}.Dockerfile"
    ignore = (ROOT / "docker" / f"{image}.Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*"
    kept = {entry[1:].rstrip("/") for entry in ignore if entry.startswith("!")}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for instruction in (i for stage in dockerfile_stages(dockerfile) for i in stage):
        if instruction.startswith("COPY ") and "--from=" not in instruction:
            for source in instruction.split()[1:-1]:
                assert (ROOT / source).exists() and source.rstrip("/") in kept, f"{image}: COPY {source}"
        for extra in re.findall(r'pip install[^\n]*"\.\[(\w+)\]"', instruction):
            assert extra in extras, f"{image}: unknown extra [{extra}]"


def test_gateway_image_is_torch_free_non_root_and_health_checked():
    final = dockerfile_stages(ROOT / "docker" / "gateway.Dockerfile")[-1]
    assert final[0].startswith("FROM python:3.11-slim")
    (user,) = [i.split()[1] for i in final if i.startswith("USER ")]
    assert user not in {"root", "0"}
    (health,) = [i for i in final if i.startswith("HEALTHCHECK ")]
    assert "/healthz" in health
    text = (ROOT / "docker" / "gateway.Dockerfile").read_text()
    assert '".[serve]"' in text and "[train]" not in text
    assert 'ENTRYPOINT ["slsg"]' in text and 'CMD ["serve", "--backend", "triton"]' in text


def _compose_client() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.skip("no docker compose client here (`docker compose version` fails and no docker-compose)")


@pytest.mark.parametrize("profile", [None, "train"])
def test_docker_compose_config_validates(profile):
    client = _compose_client()
    args = [*client, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE)]
    if profile:
        args += ["--profile", profile]
    result = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_docker_compose_refuses_to_start_without_the_keys(tmp_path):
    client = _compose_client()
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = subprocess.run([*client, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file",
                             str(empty), "config", "-q"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "SLSG_API_KEYS" in result.stderr + result.stdout


def test_gateway_reads_the_desired_state_from_the_repository_triton_serves():
    """Every gateway replica polls model_repository/NAME/serving.json (`slsg deploy`) on the same folder
    Triton loads versions from, read-only."""
    env = service("gateway")["environment"]
    triton_source = {target: src for src, target in mounts("triton").items()}["/models"]
    gateway_target = mounts("gateway")[triton_source]
    assert f"{triton_source}:{gateway_target}:ro" in service("gateway")["volumes"]
    assert env["SLSG_REPOSITORY"] == gateway_target
    assert str(env["SLSG_RECONCILE_INTERVAL_S"]).startswith("${SLSG_RECONCILE_INTERVAL_S:-")
