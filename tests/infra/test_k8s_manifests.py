"""infra/k8s/*.yaml and infra/docker/Dockerfile: every manifest loads and has what KubeRay
(or Kubernetes) requires; every job command parses with the job's own argument parser;
the image pins the versions pyproject.toml pins."""
from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}
JOBS = {"localize_shards.py", "train_sat.py"}


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)", dep.strip())
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def by_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, d) for name, d in documents() if d["kind"] == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec, standalone or inside a RayJob / RayCronJob."""
    out = []
    for name, d in documents():
        if d["kind"] == "RayCluster":
            out.append((name, d["spec"]))
        elif d["kind"] == "RayJob":
            out.append((name, d["spec"]["rayClusterSpec"]))
        elif d["kind"] == "RayCronJob":
            out.append((name, d["spec"]["jobTemplate"]["rayClusterSpec"]))
    return out


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def load_job(script: str):
    spec = importlib.util.spec_from_file_location(f"k8s_{script[:-3]}", REPO / "jobs" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_job_command(argv: list[str]):
    """``python /opt/satloc/jobs/X.py ...`` -> the options X's own parser makes of it."""
    assert argv[0] == "python", argv
    script = Path(argv[1])
    assert script.parent.as_posix() == "/opt/satloc/jobs" and script.name in JOBS, argv[1]
    return script.name, load_job(script.name).parse_args(argv[2:])


CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def valid_cron(schedule: str) -> bool:
    fields = schedule.split()
    if len(fields) != 5:
        return False
    for field, (low, high) in zip(fields, CRON_RANGES):
        if not CRON_FIELD.match(field):
            return False
        if any(not low <= int(n) <= high for n in re.findall(r"(?<![/\d])\d+", field)):
            return False
    return True


def test_cron_validator():
    assert valid_cron("30 2 * * *") and valid_cron("*/15 0-6 1,15 * 1-5")
    for bad in ("30 2 * *", "61 2 * * *", "30 24 * * *", "@daily", "30 2 * * * *", "a b c d e"):
        assert not valid_cron(bad), bad


def test_every_manifest_loads_with_the_kinds_we_ship():
    kinds = sorted((name, d["kind"]) for name, d in documents())
    assert kinds == [
        ("cronjob-localize-nightly.yaml", "CronJob"),
        ("raycluster.yaml", "RayCluster"),
        ("raycronjob-localize-nightly.yaml", "RayCronJob"),
        ("rayjob-localize.yaml", "RayJob"),
        ("rayjob-train.yaml", "RayJob"),
    ]
    for name, d in documents():
        assert d["metadata"]["name"] and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"])
        expected = "ray.io/v1" if d["kind"] in RAY_KINDS else "batch/v1"
        assert d["apiVersion"] == expected, name


def test_ray_clusters_have_a_cpu_less_head_and_gpu_workers():
    ray_version = pyproject_pins()["ray"]
    specs = cluster_specs()
    assert len(specs) == 4
    for name, spec in specs:
        assert spec["rayVersion"] == ray_version, name
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", name  # a string, as rayStartParams require
        head_ports = {p["name"]: p["containerPort"] for p in containers(head["template"])[0]["ports"]}
        assert head_ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}, name
        groups = spec["workerGroupSpecs"]
        assert groups and all(g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups)
        for group in groups:
            for c in containers(group["template"]):
                limits, requests = c["resources"]["limits"], c["resources"]["requests"]
                assert int(limits["nvidia.com/gpu"]) == 1 and int(requests["nvidia.com/gpu"]) == 1, name
            tolerations = group["template"]["spec"]["tolerations"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_s3_credentials_and_ray_token_come_from_secrets():
    for name, spec in cluster_specs():
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for c in containers(pod):
                env = {e["name"]: e for e in c["env"]}
                for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    ref = env[var]["valueFrom"]["secretKeyRef"]
                    assert ref == {"name": "satloc-s3", "key": var} and "value" not in env[var], (name, var)
                assert c["image"] == "registry.example.com/satloc:0.1.0"
                # Token auth on every Ray container: by hand (the long-lived cluster) or by KubeRay.
                if "authOptions" in spec:
                    assert spec["authOptions"]["mode"] == "token"
                else:
                    assert env["RAY_AUTH_MODE"]["value"] == "token"
                    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
                        "name": "satloc-ray-token", "key": "auth_token"}
    raycluster = by_kind("RayCluster")[0][1]["spec"]
    auto_env = {e["name"]: e for e in raycluster["autoscalerOptions"]["env"]}
    assert auto_env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in auto_env["RAY_AUTH_TOKEN"]["valueFrom"]
    # No literal secret anywhere in the manifests.
    text = "\n".join(p.read_text() for p in K8S.glob("*.yaml"))
    assert not re.search(r"(?i)(secret_access_key|auth_token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,}", text)


def test_rayjob_entrypoints_call_our_jobs_with_valid_flags():
    jobs = {}
    for name, d in by_kind("RayJob"):
        spec = d["spec"]
        script, options = parse_job_command(shlex.split(spec["entrypoint"]))
        jobs[script] = options
        assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    localize, train = jobs["localize_shards.py"], jobs["train_sat.py"]
    assert localize.shards == "s3://satloc-data/wds/val-{000000..000049}.tar"  # quoted: no shell brace expansion
    assert localize.run_id and localize.output.startswith("s3://")
    assert train.use_gpu and train.num_workers == 4 and train.max_failures >= 1
    assert train.recipe == "cub" and (train.train.lr, train.train.schedule, train.train.batch_size) == (
        1e-4, "constant", 256)
    assert train.name and train.storage_path.startswith("s3://")  # same name + storage = resume
    train_groups = by_kind("RayJob")
    workers = next(d for n, d in train_groups if n == "rayjob-train.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert sum(g["replicas"] for g in workers) == train.num_workers  # one GPU worker per Ray Train worker
    # Each Ray Train worker takes most of its pod's CPUs, so its loader processes can decode
    # for the GPU (Ray's default of 1 CPU would leave one process), and the pod has the room.
    pod_cpus = min(float(c["resources"]["limits"]["cpu"]) for g in workers for c in containers(g["template"]))
    assert 4 <= train.cpus_per_worker <= pod_cpus - 1


def test_nightly_schedules_are_incremental_with_a_fixed_run_id():
    (_, cron), = by_kind("RayCronJob")
    assert valid_cron(cron["spec"]["schedule"])
    template = cron["spec"]["jobTemplate"]
    assert "entrypoint" in template and "rayClusterSpec" in template  # a RayJob spec (KubeRay 1.6)
    script, ray_cron = parse_job_command(shlex.split(template["entrypoint"]))
    assert script == "localize_shards.py" and ray_cron.run_id == "nightly" and ray_cron.shards.endswith("/")
    assert template["activeDeadlineSeconds"] < 24 * 3600  # a night's run ends before the next starts

    (_, k8s_cron), = by_kind("CronJob")
    spec = k8s_cron["spec"]
    assert valid_cron(spec["schedule"]) and spec["concurrencyPolicy"] == "Forbid" and spec["timeZone"] == "Etc/UTC"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:3] == ["python", "/opt/satloc/infra/local/cluster.py", "submit"]
    flags = command[: command.index("--")]
    assert flags[flags.index("--dated") + 1] == "satloc-loc-nightly"  # submission id satloc-loc-nightly-YYYYMMDD
    assert flags[flags.index("--address") + 1] == "http://satloc-head-svc:8265"  # RayCluster 'satloc' head Service
    token_file = Path(flags[flags.index("--token-file") + 1])
    mount = pod["containers"][0]["volumeMounts"][0]
    assert token_file.parent == Path(mount["mountPath"]) and mount["readOnly"] is True
    secret_volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
    assert secret_volume["secretName"] == "satloc-ray-token" and token_file.name == "auth_token"
    script, options = parse_job_command(command[command.index("--") + 1:])
    assert script == "localize_shards.py" and options.run_id == "nightly"
    assert (options.shards, options.output) == (ray_cron.shards, ray_cron.output)  # the same run, either way


def test_dockerfile_pins_the_pyproject_versions():
    text = DOCKERFILE.read_text()
    assert re.search(r"(?m)^ARG CUDA_IMAGE=nvidia/cuda:\S+$", text) and re.search(r"(?m)^FROM \$\{CUDA_IMAGE\}$", text)
    pins = pyproject_pins()
    found = {m.group(1).lower(): m.group(3) for m in re.finditer(r'"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^"]+)"', text)}
    for name in ("torch", "torchvision", "ray"):
        assert found.get(name) == pins[name], (name, found.get(name), pins[name])
    mismatched = {n: (v, pins.get(n)) for n, v in found.items() if pins.get(n) != v}
    assert mismatched == {}
    assert "python3.11" in text and re.search(r"(?m)^RUN pip install \. ", text)
    assert re.search(r"(?m)^USER 1000$", text)  # not root


@pytest.mark.parametrize("target", ["cluster-up", "cluster-down", "submit-demo"])
def test_make_targets_exist(target):
    text = (REPO / "infra" / "local" / "cluster.mk").read_text()
    assert re.search(rf"(?m)^{target}:", text)
    assert "-include infra/local/cluster.mk" in (REPO / "Makefile").read_text()
