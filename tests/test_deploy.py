"""Deployment files: the Kubernetes manifests against the API schemas (kubernetes-validate,
strict) and against the daemon they run (arguments, ports, probe paths), and the systemd
unit (systemd-analyze verify where present, and its ExecStart against `ems serve`)."""
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

import cluster_rig as rig
import ems
from ems import serve, uninstall
from ems.manage import cli as manage_cli

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SYSTEMD = ROOT / "deploy" / "systemd"
# A release whose schemas every kubernetes-validate from 1.30 on ships.
KUBERNETES_VERSION = "1.30.0"
# Manifests applied on purpose, not through kustomize.
STANDALONE = {"base/secret.example.yaml", "uninstall/zookeeper-job.yaml",
              "uninstall/node-cleanup.yaml"}


def load(path: Path) -> list[dict]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def manifests() -> list[Path]:
    """Every complete manifest: the base and the standalone files. Overlay files are
    patches, checked once kustomize has rendered them."""
    return sorted(p for p in K8S.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and "overlays" not in p.parts)


def find(kind: str, name: str, paths=None) -> dict:
    for path in paths or manifests():
        for doc in load(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in {K8S}")


def container(workload: dict, name: str) -> dict:
    spec = workload["spec"]["template"]["spec"]
    return next(c for c in spec.get("containers", []) + spec.get("initContainers", [])
                if c["name"] == name)


def expand(values: list[str], env: dict) -> list[str]:
    """Expand Kubernetes' $(VAR) references the way the kubelet does."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value) for value in values]


def port_number(spec: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in spec["ports"] if p["name"] == port)


def quantity_bytes(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(text))
    assert match, f"unexpected quantity {text!r}"
    return int(match.group(1)) * units.get(match.group(2), 1)


@pytest.fixture
def ems_env(monkeypatch):
    """Return a setter of EMS_* variables, with every other EMS_* variable removed."""
    for name in list(os.environ):
        if name.startswith("EMS_"):
            monkeypatch.delenv(name)

    def apply(values: dict):
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    return apply


def validate(paths) -> str:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.fail("kubernetes-validate is not installed: pip install -e '.[ops]'")
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict",
                             "-k", KUBERNETES_VERSION, *map(str, paths)],
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARN" not in output, output
    assert "ERROR" not in output, output
    return output


# ---- Kubernetes --------------------------------------------------------------------------

def test_manifests_pass_kubernetes_validate():
    paths = manifests()
    output = validate(paths)
    resources = sum(len(load(path)) for path in paths)
    assert output.count(" passed for resource ") == resources, output


def test_kustomizations_name_every_file():
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    listed = set(base["resources"])
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {Path(p).name for p in STANDALONE if p.startswith("base/")}
    for kustomization in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(kustomization.read_text())
        for entry in doc.get("resources", []) + [p["path"] for p in doc.get("patches", [])]:
            assert (kustomization.parent / entry).exists(), f"{kustomization}: {entry}"
    standalone = {str(p.relative_to(K8S)) for p in manifests()} - {
        f"base/{name}" for name in listed}
    assert standalone == STANDALONE


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("directory", ["base", "overlays/spill"])
def test_rendered_kustomization_validates(directory, tmp_path, ems_env):
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S / directory)],
                              capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.stdout)
    validate([out])

    docs = load(out)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"ems"}
    config = next(d for d in docs if d["kind"] == "ConfigMap" and
                  d["metadata"]["name"] == "ems-config")["data"]
    daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in container(daemonset, "ems")["volumeMounts"]}
    if config["EMS_SPILL_DIR"]:
        assert config["EMS_SPILL_DIR"] in mounts
        assert config["EMS_SPILL_SIZE"]
        hostpaths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
        assert config["EMS_SPILL_DIR"] in hostpaths
        assert config["EMS_SPILL_DIR"] in " ".join(container(daemonset, "run-dir")["command"])
    ems_env(config)
    args = expand(container(daemonset, "ems")["args"], {"NODE_NAME": "n1", "POD_IP": "10.1.2.3"})
    parsed = serve.build_parser().parse_args(args)
    assert (parsed.spill_dir or None) == (config["EMS_SPILL_DIR"] or None)


def test_daemonset_args_match_daemon(ems_env):
    daemonset = find("DaemonSet", "ems-node")
    config = find("ConfigMap", "ems-config")["data"]
    ems_env(config)
    node = container(daemonset, "ems")
    assert node["command"] == ["ems", "serve"]
    env = {"NODE_NAME": "node-1.example", "POD_IP": "10.1.2.3"}
    args = serve.build_parser().parse_args(expand(node["args"], env))

    assert args.node_id == "node-1.example"
    assert args.host == args.metrics_host == "10.1.2.3"
    assert args.port == port_number(node, "data")
    assert args.metrics_port == port_number(node, "metrics")
    for port in node["ports"]:
        assert port["hostPort"] == port["containerPort"]
    assert daemonset["spec"]["template"]["spec"]["hostNetwork"] is True
    assert daemonset["spec"]["template"]["spec"]["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert args.log_format == "json"
    assert args.zookeeper == config["EMS_ZOOKEEPER"]

    # Probes reach the metrics server that --metrics-port opens.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        http = node[probe]["httpGet"]
        assert port_number(node, http["port"]) == args.metrics_port, probe
        assert http["path"] == "/healthz", probe

    # The socket and the run directory are on the hostPath that engines share.
    mounts = {m["name"]: m["mountPath"] for m in node["volumeMounts"]}
    assert os.path.dirname(args.socket) == mounts["run"] == config["EMS_RUN_DIR"]
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["run"]["hostPath"]["path"] == config["EMS_RUN_DIR"]
    assert "run-dir" in [c["name"] for c in daemonset["spec"]["template"]["spec"]
                         ["initContainers"]]

    secret_env = {e["name"]: e for e in node["env"]}
    assert secret_env["EMS_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "ems-secrets"
    secret = find("Secret", "ems-secrets")
    assert secret_env["EMS_SECRET"]["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
    assert volumes["manage-key"]["secret"]["items"][0]["key"] in secret["stringData"]


def test_daemonset_hugepages_hold_pool(make_pool, ems_env):
    """--pages hugetlb fails unless the hugepages limit covers the pool's whole mapping:
    the data plus the index, rounded up to 2 MiB."""
    daemonset = find("DaemonSet", "ems-node")
    config = find("ConfigMap", "ems-config")["data"]
    resources = container(daemonset, "ems")["resources"]
    assert resources["requests"]["hugepages-2Mi"] == resources["limits"]["hugepages-2Mi"]
    assert "memory" in resources["requests"]
    huge = quantity_bytes(resources["limits"]["hugepages-2Mi"])

    capacity = serve.parse_size(config["EMS_CAPACITY"])
    # The index has one entry per 16 KiB of pool (EMS_DEFAULT_BLOCK_HINT in csrc/pool.h);
    # its size per entry is measured on a small pool.
    stats = make_pool(64 << 20, pages="small").stats()
    index_bytes = capacity // (16 << 10) * stats["metadata_bytes"] / stats["max_blocks"]
    index = -(-int(index_bytes) // (2 << 20)) * (2 << 20)
    assert huge >= capacity + index, (huge, capacity, index)
    assert huge % (2 << 20) == 0


def test_probe_paths_served_by_daemon(tmp_path):
    """The probe paths return 200 on a real daemon's metrics port."""
    daemonset = find("DaemonSet", "ems-node")
    node = container(daemonset, "ems")
    paths = {node[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe",
                                                   "readinessProbe")}
    (daemon,) = rig.plan(str(tmp_path), ["probe"])
    rig.start(daemon, str(tmp_path), capacity="16M")
    try:
        for path in sorted(paths) + ["/activation"]:
            url = f"http://127.0.0.1:{daemon.metrics_port}{path}"
            with urllib.request.urlopen(url, timeout=5) as reply:
                assert reply.status == 200, path
    finally:
        assert rig.stop(daemon) == 0


def test_manage_deployment_args(monkeypatch):
    deployment = find("Deployment", "ems-manage")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    manage = container(deployment, "manage")
    calls = []
    monkeypatch.setattr(manage_cli, "_serve", lambda parser, args: calls.append(args) or 0)
    monkeypatch.setattr(manage_cli, "_init", lambda parser, args: calls.append(args) or 0)

    assert manage["command"][:3] == ["ems", "manage", "serve"]
    assert manage_cli.manage_main(manage["command"][2:] + manage["args"]) == 0
    served = calls.pop()
    assert served.port == port_number(manage, "https")
    assert served.metrics_port == port_number(manage, "metrics")
    mounts = {m["name"]: m["mountPath"] for m in manage["volumeMounts"]}
    assert served.dir == mounts["data"]
    for probe in ("readinessProbe", "livenessProbe"):
        http = manage[probe]["httpGet"]
        assert (http["path"], http["scheme"], http["port"]) == ("/healthz", "HTTPS", "https")

    script = container(deployment, "init")["command"][-1]
    init_args = shlex.split(script.split("exec", 1)[1])
    assert init_args[:3] == ["ems", "manage", "init"]
    assert manage_cli.manage_main(init_args[2:]) == 0
    assert calls.pop().dir == served.dir

    service = find("Service", "ems-manage")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"https", "metrics"}


def test_zookeeper_ensemble_matches_config():
    statefulset = find("StatefulSet", "ems-zookeeper")
    headless = statefulset["spec"]["serviceName"]
    assert find("Service", headless)["spec"]["clusterIP"] == "None"
    replicas = statefulset["spec"]["replicas"]
    assert replicas == 3
    cfg = dict(line.split("=", 1) for line in
               find("ConfigMap", "ems-zookeeper")["data"]["zoo.cfg"].splitlines() if line)
    servers = [f"ems-zookeeper-{i}.{headless}" for i in range(replicas)]
    assert [cfg[f"server.{i + 1}"] for i in range(replicas)] == \
        [f"{name}:2888:3888" for name in servers]
    assert cfg["clientPortAddress"] == "0.0.0.0"
    hosts = find("ConfigMap", "ems-config")["data"]["EMS_ZOOKEEPER"]
    assert hosts.split(",") == [f"{name}:{cfg['clientPort']}" for name in servers]


def test_uninstall_manifests_parse(ems_env):
    config = find("ConfigMap", "ems-config")["data"]
    job = find("Job", "ems-uninstall-zookeeper")
    step = container(job, "uninstall")
    assert step["command"] == ["ems", "uninstall"]
    args = uninstall.build_parser().parse_args(expand(step["args"], config))
    assert (args.zookeeper, args.cluster, args.yes) == (config["EMS_ZOOKEEPER"],
                                                       config["EMS_CLUSTER"], True)

    cleanup = find("DaemonSet", "ems-node-cleanup")
    script = container(cleanup, "cleanup")["command"][-1]
    words = shlex.split(script.split(";", 1)[0])
    assert words[:2] == ["ems", "uninstall"]
    args = uninstall.build_parser().parse_args(words[2:])
    assert args.run_dir == config["EMS_RUN_DIR"]
    assert args.yes
    mounts = [m["mountPath"] for m in container(cleanup, "cleanup")["volumeMounts"]]
    assert args.run_dir in mounts
    for spill in args.spill_dir:
        assert any(spill.startswith(m + "/") for m in mounts), spill


# ---- systemd -----------------------------------------------------------------------------

def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file into section -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def test_systemd_unit_settings(ems_env):
    unit = parse_unit(SYSTEMD / "ems.service")
    service = unit["Service"]
    env = parse_env_file(SYSTEMD / "ems.env")

    assert service["Type"] == ["simple"]
    assert service["Restart"] == ["on-failure"]
    assert service["User"][0] not in ("root", "0")
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["LimitMEMLOCK"]
    assert service["EnvironmentFile"] == ["/etc/ems/ems.env"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]

    writable = service["ReadWritePaths"][0].split()
    assert env["EMS_RUN_DIR"] in writable
    assert env["EMS_RUN_DIR"] == "/run/" + service["RuntimeDirectory"][0]
    assert env["EMS_SPILL_DIR"] in writable
    assert env["EMS_SPILL_DIR"] in ["/var/lib/" + d for d in service["StateDirectory"][0].split()]

    command = service["ExecStart"][0]
    used = set(re.findall(r"\$\{(\w+)\}", command))
    assert used <= set(env), used - set(env)
    argv = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], command))
    assert argv[0].endswith("/ems")
    assert argv[1] == "serve"
    ems_env(env)
    args = serve.build_parser().parse_args(argv[2:])
    assert os.path.dirname(args.socket) == env["EMS_RUN_DIR"]
    assert args.spill_dir == env["EMS_SPILL_DIR"]
    assert args.log_format == "json"
    assert serve.parse_size(args.capacity) > 0

    hugepages = (SYSTEMD / "90-ems-hugepages.conf").read_text()
    pages = int(re.search(r"^vm\.nr_hugepages\s*=\s*(\d+)", hugepages, re.M).group(1))
    assert pages * (2 << 20) > serve.parse_size(env["EMS_CAPACITY"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path):
    """systemd-analyze verify reports unknown keys and bad values. ExecStart must name an
    executable that exists, so the copy points at a stand-in."""
    stand_in = tmp_path / "ems"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = (SYSTEMD / "ems.service").read_text()
    assert "ExecStart=/opt/ems/bin/ems " in unit
    (tmp_path / "ems.service").write_text(unit.replace("/opt/ems/bin/ems", str(stand_in)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             "--recursive-errors=no", str(tmp_path / "ems.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ems.service" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_systemd_verify_catches_typo(tmp_path):
    """The check above can fail: a misspelt key makes verify exit non-zero."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    stand_in = tmp_path / "ems"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = (SYSTEMD / "ems.service").read_text().replace("/opt/ems/bin/ems", str(stand_in))
    (tmp_path / "ems.service").write_text(unit.replace("NoNewPrivileges=", "NoNewPrivilege="))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             "--recursive-errors=no", str(tmp_path / "ems.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "NoNewPrivilege" in result.stderr


def test_version_matches_image_tag():
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    tags = {image["newTag"] for image in base["images"] if image["name"] == "ems"}
    assert tags == {ems.__version__}
