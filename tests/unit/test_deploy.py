"""The deployment examples: the Kubernetes manifests, the nginx configuration, the systemd unit and the Dockerfile
agree with each other and with what stampd accepts (its configuration loader and defaults, its endpoints
/healthz, /readyz and /metrics, its listen address, its signals)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from stampd.config import Config, load_config, split_listen

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
NGINX_CONF = DEPLOY / "nginx" / "stampd.conf"
CONFIG_MOUNT = "/etc/stampd/stampd.toml"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> list[dict[str, Any]]:
    """Every Kubernetes object in deploy/kubernetes (the kustomization is kustomize's file, not an object)."""
    paths = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    return [doc for path in paths for doc in _documents(path)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [m for m in _manifests() if m["kind"] == kind and (name is None or m["metadata"].get("name") == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _deployment() -> dict[str, Any]:
    return _one("Deployment", "stampd")


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _deployment()["spec"]["template"]["spec"]
    return spec


def _container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _container_port(port: int | str) -> int:
    """A probe's or the Service's port (a number or a name) as the container's port number; it must exist."""
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    if isinstance(port, str):
        assert port in ports, f"no container port named {port!r}"
        return int(ports[port])
    assert port in ports.values(), f"no container port {port}"
    return port


def _option(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def _stampd_toml() -> str:
    text: str = _one("ConfigMap", "stampd-config")["data"]["stampd.toml"]
    return text


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "stampd.toml"
    path.write_text(text)
    return load_config(path)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return _load(tmp_path, _stampd_toml())


def test_every_manifest_parses_and_the_kustomization_lists_them() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    # The schema Job is created per rollout (generateName, `kubectl create`), so it is not a kustomize resource.
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml", "db-upgrade-job.yaml"}
    assert listed == on_disk
    for manifest in _manifests():
        assert {"apiVersion", "kind", "metadata"} <= manifest.keys()


def test_the_configmap_holds_a_production_configuration_that_stampd_loads(config: Config) -> None:
    tomllib.loads(_stampd_toml())
    assert config.clock.required
    assert len(config.clock.ntp_servers) >= 3
    assert config.records.url.startswith("postgresql")
    assert "@" in config.records.url
    userinfo = config.records.url.split("://", 1)[1].split("@", 1)[0]
    assert ":" not in userinfo, "no password in a ConfigMap: the driver takes it from PGPASSWORD"
    (tsu,) = config.tsus
    assert tsu.key.backend == "pkcs11"
    assert tsu.key.pin_file is not None and tsu.key.pin_env is None


def test_the_commented_file_key_alternative_loads_too(tmp_path: Path) -> None:
    text = _stampd_toml()
    block = re.search(r"# BEGIN file-key alternative\n(.*?)\n\s*# END file-key alternative", text, re.S)
    assert block is not None
    settings = "\n".join(line.strip().removeprefix("# ") for line in block.group(1).splitlines())
    head, _, _ = text.partition("[tsu.default.key]")
    config = _load(tmp_path, f"{head}[tsu.default.key]\n{settings}\n")
    key = config.tsus[0].key
    assert key.backend == "file"
    assert key.path is not None and key.passphrase_file is not None
    assert _mounted_file(str(key.path)) == ("secret", "stampd-tsu-key", "tsu-key.pem")
    assert _mounted_file(str(key.passphrase_file)) == ("secret", "stampd-tsu-key", "passphrase")


def test_the_container_serves_the_configmap_on_the_listen_address(config: Config) -> None:
    command = _container()["command"]
    assert command[:2] == ["stampd", "serve"]
    assert _option(command, "-c") == CONFIG_MOUNT
    host, port = split_listen(_option(command, "--listen"))
    assert host == "0.0.0.0"
    assert port == config.server.port == _container_port(port)
    assert _mounted_file(CONFIG_MOUNT) == ("configMap", "stampd-config", "stampd.toml")


def test_probes_point_at_readyz_and_healthz_on_the_container_port() -> None:
    container = _container()
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    if "startupProbe" in container:
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in (readiness, liveness):
        assert _container_port(probe["port"]) == 3180


def test_the_pod_runs_as_non_root_with_a_read_only_root_filesystem() -> None:
    pod = _pod_spec()["securityContext"]
    container = _container()["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= _container()["resources"]["requests"].keys()
    assert "memory" in _container()["resources"]["limits"]


def test_the_pid_file_next_to_the_configuration_is_writable() -> None:
    """`stampd serve` writes <config>.pid beside the configuration: that directory must not be read-only."""
    mounts = {m["mountPath"]: m for m in _container()["volumeMounts"]}
    parent = str(PurePosixPath(CONFIG_MOUNT).parent)
    assert parent in mounts and not mounts[parent].get("readOnly", False)
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    assert "emptyDir" in volumes[mounts[parent]["name"]]
    assert mounts[CONFIG_MOUNT].get("subPath") == "stampd.toml"


def test_the_grace_period_covers_the_pre_stop_sleep_and_a_request(config: Config) -> None:
    sleep = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    grace = _pod_spec()["terminationGracePeriodSeconds"]
    assert grace > int(sleep[1]) + config.server.request_timeout_s


def test_the_service_port_matches_the_container_port_and_the_listen_address(config: Config) -> None:
    service = _one("Service", "stampd")
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 3180
    assert _container_port(port["targetPort"]) == config.server.port == 3180
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_disruption_budget_selects_the_deployments_pods() -> None:
    pdb = _one("PodDisruptionBudget", "stampd")
    deployment = _deployment()
    assert pdb["spec"].get("minAvailable") == 1 or pdb["spec"].get("maxUnavailable") == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["replicas"] >= 2


def _mounted_file(path: str) -> tuple[str, str, str]:
    """Which ConfigMap or Secret key the container sees at ``path``: (kind, name, key); it must be there."""
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    for mount in _container()["volumeMounts"]:
        volume = volumes[mount["name"]]
        source = volume.get("configMap") or volume.get("secret")
        if source is None:
            continue
        kind, name = ("configMap", source["name"]) if "configMap" in volume else ("secret", source["secretName"])
        directory = mount["mountPath"].rstrip("/") + "/"
        if mount.get("subPath"):
            key = mount["subPath"] if mount["mountPath"] == path else None
        else:
            key = path.removeprefix(directory) if path.startswith(directory) else None
        if key is None or "/" in key:
            continue
        manifest = _one("ConfigMap" if kind == "configMap" else "Secret", name)
        keys = set(manifest.get("data", {})) | set(manifest.get("stringData", {}))
        assert key in keys, f"{path}: {kind} {name} has no key {key!r}"
        return kind, name, key
    raise AssertionError(f"{path} is not mounted from a ConfigMap or a Secret")


def test_every_file_the_configuration_names_is_mounted(config: Config) -> None:
    (tsu,) = config.tsus
    assert tsu.key.pin_file is not None
    assert _mounted_file(str(tsu.key.pin_file)) == ("secret", "stampd-hsm-pin", "pin")
    for path in (tsu.certificate, *tsu.chain, tsu.trust_anchor):
        assert _mounted_file(str(path))[:2] == ("configMap", "stampd-pki")


def test_secrets_are_placeholders_mounted_as_files_or_given_to_the_driver() -> None:
    secrets = [m for m in _manifests() if m["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        assert "data" not in secret, "placeholders go in stringData, in clear, so nobody mistakes them for real"
        for value in secret["stringData"].values():
            assert "REPLACE" in value
    env = {e["name"]: e for e in _container()["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "stampd-postgres", "key": "password"}


def test_the_schema_job_upgrades_the_records_of_the_same_configuration() -> None:
    (job,) = _documents(KUBERNETES / "db-upgrade-job.yaml")
    assert job["kind"] == "Job" and "generateName" in job["metadata"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["stampd", "db", "upgrade", "-c", CONFIG_MOUNT]
    assert container["image"] == _container()["image"]
    (mount,) = (m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_MOUNT)
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "stampd-config"


def _nginx(directive: str) -> list[str]:
    text = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    return [m.strip() for m in re.findall(rf"^\s*{directive}\s+([^;]*);", text, re.M)]


def _nginx_size(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmM]?)", value)
    assert match, value
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]


def _nginx_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)?", value)
    assert match, value
    return int(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]


def test_nginx_body_limit_matches_max_request_bytes(config: Config) -> None:
    sizes = _nginx("client_max_body_size")
    assert sizes
    assert {_nginx_size(size) for size in sizes} == {config.server.max_request_bytes}


def test_nginx_reuses_upstream_connections_and_drops_them_before_stampd_does(config: Config) -> None:
    assert _nginx("keepalive")
    assert set(_nginx("proxy_http_version")) == {"1.1"}
    assert set(_nginx("proxy_set_header Connection")) == {'""'}
    assert len(_nginx("proxy_pass")) == len(_nginx("proxy_http_version"))
    # stampd's keep-alive timeout is server.request_timeout: nginx must not reuse a connection stampd is closing.
    text = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    upstream = re.search(r"upstream\s+stampd\s*\{(.*?)\}", text, re.S)
    assert upstream is not None
    timeout = re.search(r"keepalive_timeout\s+(\S+);", upstream.group(1))
    assert timeout is not None
    assert _nginx_seconds(timeout.group(1)) < config.server.request_timeout_s
    servers = re.findall(r"^\s*server\s+(\S+)", upstream.group(1), re.M)
    assert len(servers) >= 2 and all(s.endswith(f":{config.server.port}") for s in servers)


def test_nginx_terminates_tls_and_passes_the_client_address() -> None:
    assert any("443 ssl" in listen for listen in _nginx("listen"))
    assert _nginx("ssl_certificate") and _nginx("ssl_certificate_key")
    assert "$proxy_add_x_forwarded_for" in _nginx("proxy_set_header X-Forwarded-For")
    assert "/healthz" in NGINX_CONF.read_text()


# --- metrics scraping, the systemd unit and the container image ---

SYSTEMD_UNIT = DEPLOY / "systemd" / "stampd.service"
DOCKERFILE = DEPLOY.parent / "Dockerfile"
DOCKERIGNORE = DEPLOY.parent / ".dockerignore"


def test_the_pods_are_scraped_at_metrics_on_the_container_port() -> None:
    annotations = _deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert _container_port(int(annotations["prometheus.io/port"])) == 3180


def _defaults(tmp_path: Path) -> Config:
    """A configuration that sets nothing it need not: the defaults the image and the unit must agree with."""
    return _load(
        tmp_path,
        '[tsu.default]\ndefault_policy = "1.2.3"\ncertificate = "c.pem"\ntrust_anchor = "r.pem"\n'
        '[tsu.default.key]\npath = "k.pem"\npassphrase_env = "P"\n',
    )


def _unit() -> dict[str, list[str]]:
    """The systemd unit's directives: name -> every value given (a directive may repeat)."""
    directives: dict[str, list[str]] = {}
    for line in SYSTEMD_UNIT.read_text().splitlines():
        if line.strip() and not line.startswith(("#", "[")):
            name, _, value = line.partition("=")
            directives.setdefault(name.strip(), []).append(value.strip())
    return directives


def test_the_systemd_unit_is_hardened() -> None:
    unit = _unit()

    def one(name: str) -> str:
        assert len(unit.get(name, [])) == 1, f"{name}: {unit.get(name)}"
        return unit[name][0]

    assert one("User") not in ("", "root", "0") or one("DynamicUser") == "yes"
    for name, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
        "StateDirectory": "stampd",
        "UMask": "0077",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    }.items():
        assert one(name) == value, name
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "/var/lib/stampd" in one("ReadWritePaths").split()
    # The kernel's clock discipline is read with adjtimex (clock.kernel_discipline): allowed, and not taken
    # away again by ProtectClock or a deny list naming @clock or @privileged.
    filters = " ".join(unit["SystemCallFilter"]).split()
    assert "@system-service" in filters and "adjtimex" in filters
    assert not any(f.startswith("~") for f in filters) and "ProtectClock" not in unit


def test_the_systemd_unit_serves_checks_and_stops_within_its_timeout(tmp_path: Path) -> None:
    unit = _unit()
    (start,) = unit["ExecStart"]
    (check,) = unit["ExecStartPre"]
    executable, *arguments = start.split()
    assert arguments[:1] == ["serve"] and "--listen" not in arguments
    config_file = _option(arguments, "-c")
    assert check.split() == [executable, "config", "check", config_file]
    assert f"STAMPD_CONFIG={config_file}" in unit["Environment"]
    defaults = _defaults(tmp_path)
    (timeout,) = unit["TimeoutStopSec"]
    assert int(timeout) > defaults.server.request_timeout_s, "the stop timeout must cover the longest request"


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (continuation lines joined), grouped by stage."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, argument = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), argument.strip()))
    return stages


def test_the_dockerfile_builds_a_wheel_and_runs_it_as_non_root(tmp_path: Path) -> None:
    build, runtime = _dockerfile_stages()
    assert any(i == "RUN" and "pip wheel" in a for i, a in build)
    assert ("COPY", "--from=build /opt/stampd /opt/stampd") in runtime
    final = dict(runtime)  # the last value of each instruction
    user = final["USER"].split(":")[0]
    assert user not in ("0", "root")
    pod = _pod_spec()["securityContext"]
    assert int(user) == pod["runAsUser"], "the image's user is the one the Deployment runs as"
    port = _defaults(tmp_path).server.port
    assert final["EXPOSE"] == str(port) == str(_container_port("http"))
    assert "/var/lib/stampd" in final["VOLUME"]
    assert f"http://127.0.0.1:{port}/healthz" in final["HEALTHCHECK"]
    command = json.loads(final["CMD"])
    assert json.loads(final["ENTRYPOINT"]) == ["stampd"] and command[0] == "serve"
    assert _option(command, "-c") == CONFIG_MOUNT
    assert split_listen(_option(command, "--listen")) == ("0.0.0.0", port)
    assert final["STOPSIGNAL"] == "SIGTERM"


def test_the_build_context_leaves_keys_records_and_environments_out() -> None:
    rules = [line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*", "an allow-list: nothing enters the build context unless named"
    allowed = {rule.removeprefix("!").rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "src"}
