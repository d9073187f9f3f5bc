"""docker-compose.yml and configs/: checked by the compose client, and every service's command run locally.

No Docker engine runs here, so the compose file is validated with ``docker-compose config`` and each
service's command is started as a local process, container paths mapped to temporary folders. That way
the file cannot drift from the CLI and the example configs.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from coordinator.settings import CoordinatorSettings
from gradpool.config import load_settings
from gradpool.processes import Processes
from node.settings import MinerSettings, ValidatorSettings
from tests.helpers.cli import gradpool
from tests.helpers.required import required
from tests.helpers.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_TLS = REPO / "docker-compose.tls.yml"  # merged over COMPOSE: HTTPS
COORDINATOR_TOML = REPO / "configs" / "coordinator.toml"
MINER_TOML = REPO / "configs" / "miner.toml"
MINERS = ["miner-1", "miner-2", "miner-3"]
NODES = [*MINERS, "validator"]
GPU_MINERS = ["miner-gpu-1", "miner-gpu-2"]  # profile "gpu"
VALIDATOR_TOML = REPO / "configs" / "validator.toml"
FAST_ENV = {
    "GRADPOOL_RECIPE__INNER_STEPS": "4",
    "GRADPOOL_RECIPE__BATCH_SIZE": "4",
    "GRADPOOL_DATA__EVAL_EVERY": "20",
    "GRADPOOL_DATA__EVAL_SEQUENCES": "16",
    "GRADPOOL_VALIDATION__OTHER_SEQUENCES": "32",
}


def _compose_client() -> list[str] | None:
    if exe := shutil.which("docker-compose"):
        return [exe]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def _client() -> list[str]:
    """The compose client; a test that needs one is skipped without it, except in CI (which installs it)."""
    return required(_compose_client(), "docker-compose", "apt-get install docker-compose")


def _merged(*files: Path) -> dict[str, Any]:
    """The services as the compose client resolves the files, merged in order."""
    args = [a for f in files for a in ("--file", str(f))]
    done = subprocess.run(
        [*_client(), *args, "--profile", "gpu", "config"],
        capture_output=True,
        text=True,
        timeout=50,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    services: dict[str, Any] = yaml.safe_load(done.stdout)["services"]
    return services


def _services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


@pytest.mark.timeout(60)
def test_compose_client_accepts_the_file() -> None:
    client = _client()
    every = ["--profile", "gpu", "--profile", "cluster"]
    for profile in ([], ["--profile", "gpu"], ["--profile", "cluster"], every):  # each profile validates
        done = subprocess.run(
            [*client, "--file", str(COMPOSE), *profile, "config"],
            capture_output=True,
            text=True,
            timeout=50,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    assert {"coordinator", *NODES, *GPU_MINERS} <= set(resolved)
    for name in GPU_MINERS:
        assert resolved[name]["profiles"] == ["gpu"] and "--device" in resolved[name]["command"]
        devices = resolved[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
        assert resolved[name]["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    for name, service in _services().items():
        assert resolved[name].get("command") == service.get("command"), (
            f"{name}: command changed by the client"
        )
    assert {"prometheus", "grafana"} <= set(resolved)
    sources = [
        v["source"] if isinstance(v, dict) else v.split(":")[0]  # long or short volume syntax
        for s in ("prometheus", "grafana")
        for v in resolved[s]["volumes"]
    ]
    mounts = {src.split("/deploy/")[-1] for src in sources if "/deploy/" in src}
    assert mounts == {
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "grafana/provisioning",
        "grafana/dashboards",
    }
    for name in [*MINERS, *GPU_MINERS]:  # Prometheus scrapes each miner's --metrics-port
        command = resolved[name]["command"]
        assert command[command.index("--metrics-port") + 1] == "9100"
    for name in [*NODES, *GPU_MINERS]:
        assert resolved[name]["depends_on"]["coordinator"]["condition"] == "service_healthy"
        assert resolved[name]["restart"] == "unless-stopped"
    assert "/healthz" in " ".join(resolved["coordinator"]["healthcheck"]["test"])
    _check_cluster(resolved)


def _check_cluster(resolved: dict[str, Any]) -> None:
    """Profile "cluster": two replicas of one command on PostgreSQL and the bucket, each with its own name
    and URL, nginx in front of both, the nodes behind nginx."""
    replicas = ["coordinator-a", "coordinator-b"]
    assert all(resolved[n]["profiles"] == ["cluster"] for n in [*replicas, "postgres", "minio", "lb"])
    assert resolved["coordinator-a"]["command"] == resolved["coordinator-b"]["command"]
    config = resolved["coordinator-a"]["command"][resolved["coordinator-a"]["command"].index("--config") + 1]
    blobs = CoordinatorSettings(**tomllib.loads((REPO / config.removeprefix("/app/")).read_text())).blobs
    assert blobs.backend == "s3" and blobs.direct_uploads and blobs.redirect_downloads
    for name in replicas:
        env = resolved[name]["environment"]
        assert (
            env["GRADPOOL_STORE__URL"].startswith("postgresql://")
            and "@postgres:" in env["GRADPOOL_STORE__URL"]
        )
        assert env["GRADPOOL_CLUSTER__NAME"] == name and env["GRADPOOL_CLUSTER__URL"] == f"http://{name}:8000"
        assert env["GRADPOOL_IDENTITY__KEY"].startswith("/keys/")  # one network key for both
        assert resolved[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    conf = (REPO / "deploy" / "nginx" / "cluster.conf").read_text()
    assert all(f"server {n}:8000" in conf for n in replicas) and "http_503" in conf
    for name in ("cluster-miner-1", "cluster-miner-2", "cluster-validator"):
        command = resolved[name]["command"]
        assert command[command.index("--coordinator") + 1] == "http://lb:8000"


def _local_command(command: list[str], paths: dict[str, Path], url: str | None = None) -> list[str]:
    """A service's command with container paths, host, port and the coordinator's URL made local."""
    assert isinstance(command, list), "compose commands must be in list form"
    out: list[str] = []
    for i, arg in enumerate(str(a) for a in command):
        flag = str(command[i - 1]) if i else ""
        if flag in ("--host", "--metrics-host"):
            arg = "127.0.0.1"
        elif flag in ("--port", "--metrics-port"):
            arg = "0"
        elif url is not None and arg.startswith(("http://coordinator:", "https://coordinator:")):
            arg = url
        for inside, local in paths.items():
            if arg == inside or arg.startswith(inside + "/"):
                arg = str(local) + arg[len(inside) :]
        out.append(arg)
    return out


def _volumes(service: dict[str, Any], root: Path) -> dict[str, Path]:
    """Container path -> a local folder for each volume (one per volume name under ``root``, shared by the
    services that mount it), and /app -> the repository (the image)."""
    paths = {"/app": REPO}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        paths[target] = root / source
        paths[target].mkdir(parents=True, exist_ok=True)
    return paths


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _run_healthcheck(test: list[str], url: str, paths: dict[str, Path] | None = None) -> None:
    """The coordinator's healthcheck, pointed at the local process (and its files), must pass."""
    assert test[:2] == ["CMD", "python"], "the slim image has python, not curl"
    args = [re.sub(r"https?://127\.0\.0\.1:8000", url, a) for a in test[2:]]
    for inside, local in (paths or {}).items():
        args = [a.replace(f"'{inside}/", f"'{local}/") for a in args]
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"healthcheck failed: {done.stderr}"


def _wait_for_update(procs: Processes, url: str, timeout_s: float) -> dict[str, Any]:
    """The status once every miner registered and a round closed with an accepted update."""
    with httpx.Client(base_url=url, timeout=10.0) as http:

        def updated() -> dict[str, Any] | None:
            dead = procs.dead()
            assert not dead, "\n".join(f"{n} exited with {c}:\n{procs.tail(n, 20)}" for n, c in dead.items())
            status: dict[str, Any] = http.get("/v1/status").json()
            accepted = any(r["accepted"] >= 1 and r["version"] >= 1 for r in status["rounds"])
            return status if accepted and status["miners"] == len(MINERS) else None

        return wait_until(updated, timeout_s, "every miner registered and an accepted update", interval_s=0.3)


def _wait_for_log(procs: Processes, name: str, text: str, timeout_s: float) -> None:
    def logged() -> bool:
        assert name not in procs.dead(), f"{name} exited:\n{procs.tail(name, 20)}"
        return text in procs.tail(name, 1000)

    try:
        wait_until(logged, timeout_s, f"{name} to log {text!r}", interval_s=0.3)
    except AssertionError as e:
        raise AssertionError(f"{e}:\n{procs.tail(name, 20)}") from None


@pytest.mark.slow  # the compose services as a real network
@pytest.mark.timeout(300)
def test_compose_services_run_as_local_processes(tmp_path: Path, corpus_file: Path) -> None:
    services = _services()
    procs = Processes(tmp_path / "logs")
    roots = {name: tmp_path / name for name in services}
    ready = tmp_path / "coordinator.ready"
    try:
        coordinator = services["coordinator"]
        command = _local_command(coordinator["command"], _volumes(coordinator, roots["coordinator"]))
        assert command[:2] == ["coordinator", "serve"], command
        env = {**_environment(coordinator), **FAST_ENV}
        args = [*command[2:], "--corpus", str(corpus_file)]
        url = procs.start_coordinator(args, ready, env=env, timeout_s=60)
        _run_healthcheck(coordinator["healthcheck"]["test"], url)
        for name in NODES:
            service = services[name]
            command = _local_command(service["command"], _volumes(service, roots[name]), url)
            procs.start(name, [*command, "--threads", "1"], env=_environment(service))
        status = _wait_for_update(procs, url, timeout_s=180)
        _wait_for_log(procs, "validator", "posted", timeout_s=60)
    finally:
        procs.stop_all(grace_s=30)
    codes = {name: p.returncode for name, p in procs.procs.items()}
    assert None not in codes.values(), f"a process is still running: {codes}"
    assert all(codes[name] == 0 for name in NODES), f"nodes must stop cleanly on SIGTERM: {codes}"
    assert codes["coordinator"] in (0, -signal.SIGTERM), f"coordinator did not stop on SIGTERM: {codes}"

    run = status["run"]
    assert run["model"] == "tiny" and run["codec"] == {"name": "sparseloco", "k": 64, "tile": 64}
    assert run["recipe"]["inner_steps"] == 4 and run["recipe"]["batch_size"] == 4  # env over the TOML
    assert run["eval_every"] == 20
    assert run["num_sequences"] < 5000, "--corpus was not used"
    assert all(r["rejected"] == 0 for r in status["rounds"])
    made = status["round"]["newest"] or 0  # overlapped rounds: a version made may not be trained from yet
    assert max(status["round"]["version"], made) >= 1
    assert (roots["coordinator"] / "coordinator-data" / "state.db").is_file()  # --state-dir /data
    assert (roots["validator"] / "validator-keys" / "validator.pem").is_file()
    for name in MINERS:
        assert (roots[name] / f"{name}-keys" / "miner.pem").is_file()  # --key /keys/... --create-key


def _switched_on(toml_path: Path) -> str:
    """The example file with its commented-out settings (``# key = value``) switched on."""
    return re.sub(r"(?m)^# ?([a-z][a-z0-9_]* = )", r"\1", toml_path.read_text())


def _assert_documents_every_field(doc: dict[str, Any], cls: type[BaseModel], where: str) -> None:
    assert set(doc) == set(cls.model_fields), f"{where}: settings and example differ"
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            _assert_documents_every_field(doc[name], field.annotation, f"{where}[{name}]")


def test_example_configs_load(tmp_path: Path) -> None:
    coordinator = load_settings(CoordinatorSettings, COORDINATOR_TOML, {})
    assert isinstance(coordinator, CoordinatorSettings)
    assert (
        coordinator.model == "tiny" and coordinator.codec.name == "sparseloco" and coordinator.codec.k == 64
    )
    assert coordinator.recipe.inner_steps == 20 and coordinator.recipe.batch_size == 8
    assert coordinator.rounds.min_quorum == 2 and coordinator.data.max_tokens == 4_000_000
    assert coordinator.data.corpus is None and coordinator.outer.lr is None
    miner = load_settings(MinerSettings, MINER_TOML, {"threads": 2})
    assert isinstance(miner, MinerSettings)
    assert miner.coordinator == "http://127.0.0.1:8000" and miner.device == "auto" and miner.create_key
    assert miner.threads == 2 and miner.timeout_s == 30.0

    examples: list[tuple[Path, type[BaseSettings]]] = [
        (COORDINATOR_TOML, CoordinatorSettings),
        (MINER_TOML, MinerSettings),
        (VALIDATOR_TOML, ValidatorSettings),
    ]
    for path, cls in examples:
        text = _switched_on(path)
        _assert_documents_every_field(tomllib.loads(text), cls, path.name)
        (tmp_path / path.name).write_text(text)
        load_settings(cls, tmp_path / path.name, {})  # the commented-out examples are valid too


@pytest.mark.timeout(60)
def test_malformed_config_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "tiny"\n[recipe\ninner_steps = 4\n')
    done = gradpool("coordinator", "serve", "--config", str(bad), timeout_s=50, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.toml" in lines[0], done.stderr
    assert not (tmp_path / "gradpool-state").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("device", "says"),
    [("tpu", "unknown device 'tpu'"), ("cuda:99", "cuda:99")],
)
def test_a_device_the_machine_cannot_use_is_one_line_error(tmp_path: Path, device: str, says: str) -> None:
    """A name torch does not know fails as the settings load; a CUDA device this machine lacks, as the
    coordinator starts: either way one line, a non-zero exit and nothing made."""
    done = gradpool("coordinator", "serve", "--device", device, "--port", "0", timeout_s=50, cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert says in done.stderr.strip().splitlines()[-1], done.stderr
    assert not (tmp_path / "gradpool-state").exists()


@pytest.mark.parametrize("name", ["gpt2-124m", "llama-150m", "llama-1b"])
def test_the_recipes_for_real_sizes_load(name: str, tmp_path: Path) -> None:
    """configs/<model>.toml: the model its name says, with its recipe, and the cosine schedule it shows
    commented out valid too."""
    path = COORDINATOR_TOML.with_name(f"{name}.toml")
    settings = load_settings(CoordinatorSettings, path, {})
    assert isinstance(settings, CoordinatorSettings)
    assert settings.model == name and settings.recipe.inner_steps == 100 and settings.recipe.warmup_steps > 0
    cosine = (
        path.read_text()
        .replace('schedule = "constant"', 'schedule = "cosine"')
        .replace("# planned", "planned")
    )
    (tmp_path / path.name).write_text(cosine)
    decaying = load_settings(CoordinatorSettings, tmp_path / path.name, {})
    assert isinstance(decaying, CoordinatorSettings) and decaying.recipe.planned_rounds is not None


@pytest.mark.slow  # a coordinator and a miner process
@pytest.mark.timeout(180)
def test_the_tls_override_serves_https_that_the_nodes_verify(tmp_path: Path, corpus_file: Path) -> None:
    """docker-compose.tls.yml over docker-compose.yml, as the compose client merges them: the certs
    service makes the network's CA and the coordinator's certificate (and keeps them on a restart), the
    coordinator serves HTTPS and passes its healthcheck, and a miner that trusts the CA mines through it."""
    services = _merged(COMPOSE, COMPOSE_TLS)
    assert "--ssl-certfile" in services["coordinator"]["command"]
    assert services["coordinator"]["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    for name in [*NODES, *GPU_MINERS]:
        command = services[name]["command"]
        assert (
            "https://coordinator:8000" in command
            and command[command.index("--ca-cert") + 1] == "/certs/ca.pem"
        )
        assert any(str(v).startswith("tls:/certs:ro") for v in services[name]["volumes"]), name
        assert services[name]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    procs = Processes(tmp_path / "logs")
    root = tmp_path / "volumes"
    try:
        certs = services["certs"]
        command = _local_command(certs["command"], _volumes(certs, root))
        assert procs.start("certs", command).wait(timeout=60) == 0, procs.log("certs")
        ca = (root / "tls" / "ca.pem").read_bytes()
        assert procs.start("certs-again", command).wait(timeout=60) == 0, procs.log("certs-again")
        assert (root / "tls" / "ca.pem").read_bytes() == ca  # a restart keeps the network's CA
        coordinator = services["coordinator"]
        paths = _volumes(coordinator, root)
        args = [*_local_command(coordinator["command"], paths)[2:], "--corpus", str(corpus_file)]
        env = {**_environment(coordinator), **FAST_ENV}
        url = procs.start_coordinator(args, tmp_path / "ready", env=env, timeout_s=60)
        assert url.startswith("https://127.0.0.1:")
        _run_healthcheck(coordinator["healthcheck"]["test"], url, paths)
        by_name = url.replace("127.0.0.1", "localhost")  # a name the certificate is for
        miner = services["miner-1"]
        command = [*_local_command(miner["command"], _volumes(miner, root), by_name), "--threads", "1"]
        code = procs.start("miner-1", [*command, "--max-rounds", "1"]).wait(timeout=120)
        assert code == 0 and "round 0: upload taken" in procs.log("miner-1"), procs.log("miner-1")
    finally:
        procs.stop_all(grace_s=30)
