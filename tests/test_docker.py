"""docker/ without Docker (there is none on these machines): the Dockerfiles copy only paths that
exist and that their build-context allow-list lets through, install the package with the tested
constraints, and run `wit`; the compose file wires MinIO, the bucket and `wit demo` together."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their line continuations joined and comments dropped (enough for ours)."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "a Dockerfile must not end in a line continuation"
    return out


def dockerfile(name: str) -> list[Instruction]:
    return parse_dockerfile((DOCKER / name).read_text())


def copy_sources(instructions: list[Instruction]) -> list[str]:
    sources = []
    for ins in instructions:
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(ins.args)
        if any(w.startswith("--from") for w in words):
            continue  # from another stage or image, not from the build context
        words = [w for w in words if not w.startswith("--")]
        assert len(words) >= 2, f"{ins.keyword} {ins.args}: needs a source and a destination"
        sources += words[:-1]
    return sources


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copied_path_exists_and_is_in_the_build_context(name):
    sources = copy_sources(dockerfile(name))
    assert sources
    allowed = {
        line[1:].strip() for line in (DOCKER / f"{name}.dockerignore").read_text().splitlines() if line.startswith("!")
    }
    for src in sources:
        assert (REPO / src).exists(), f"{name} copies {src}, which is not in the repository"
        assert src.rstrip("/") in allowed, f"{name} copies {src}, but {name}.dockerignore leaves it out"
    # the install needs every package folder pyproject.toml maps, and the readme it names
    # (read with a pattern, not tomllib: the package supports Python 3.10, which has none)
    package_dirs = re.findall(r'"wit\.\w+"\s*=\s*"(\w+)"', (REPO / "pyproject.toml").read_text())
    assert package_dirs
    needed = set(package_dirs) | {"pyproject.toml", "README.md"}
    assert needed <= set(sources), f"{name} misses {sorted(needed - set(sources))}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_entrypoint_is_wit_in_exec_form(name):
    entry = [i for i in dockerfile(name) if i.keyword == "ENTRYPOINT"]
    assert len(entry) == 1, f"{name}: one ENTRYPOINT"
    # exec form (a JSON array): signals reach wit itself, not a wrapping shell
    assert json.loads(entry[0].args) == ["wit"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_package_is_installed_with_the_tested_constraints(name):
    runs = [i.args for i in dockerfile(name) if i.keyword == "RUN"]
    installs = [r for r in runs if re.search(r"pip install .*-c constraints\.txt \.(\s|$)", r)]
    assert installs, f"{name}: no `pip install -c constraints.txt .`"
    # torch comes first from its own index (constraints.txt leaves it out), pinned like the Makefile's
    torch = [r for r in runs if "torch==" in r]
    assert torch and runs.index(torch[0]) < runs.index(installs[0])
    assert "--index-url" in torch[0]
    makefile = (REPO / "Makefile").read_text()
    args = {
        i.args.split("=", 1)[0]: i.args.split("=", 1)[1]
        for i in dockerfile(name)
        if i.keyword == "ARG" and "=" in i.args
    }
    assert f"torch=={args['TORCH_VERSION']} torchvision=={args['TORCHVISION_VERSION']}" in makefile


def test_the_cuda_image_starts_from_an_nvidia_cuda_runtime_and_takes_torch_cuda_wheels():
    ins = dockerfile("Dockerfile.cuda")
    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[1] for i in ins if i.keyword == "ARG" and "=" in i.args}
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    assert [i.args for i in ins if i.keyword == "FROM"] == ["${CUDA_IMAGE}"]
    assert re.search(r"download\.pytorch\.org/whl/cu\d+$", args["TORCH_INDEX"])
    cpu = dockerfile("Dockerfile")
    assert [i.args for i in cpu if i.keyword == "FROM"][0].startswith("python:3.11")


def test_compose_runs_the_demo_against_minio():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"minio", "create-bucket", "demo"} <= set(services)
    assert services["minio"]["image"].startswith("minio/minio")
    assert "healthcheck" in services["minio"]
    bucket = services["create-bucket"]
    assert bucket["image"].startswith("minio/mc")
    assert "mc mb" in " ".join(bucket["command"]) and "local/demo" in " ".join(bucket["command"])
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy"

    for name, dockerfile_name in (("demo", "docker/Dockerfile"), ("demo-cuda", "docker/Dockerfile.cuda")):
        demo = services[name]
        command = demo["command"]
        assert command[0] == "demo", "the entrypoint is wit: the command is `wit demo ...`"
        assert command[command.index("--root") + 1].startswith("s3://demo/")
        assert "-o" in command
        env = demo["environment"]
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
        # the demo authenticates as the MinIO root user: the same variables feed both
        assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
        assert demo["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
        assert demo["build"]["dockerfile"] == dockerfile_name
        assert (DOCKER / demo["build"]["context"] / dockerfile_name).resolve().exists()
        out = command[command.index("-o") + 1]
        assert any(v.endswith(f":{out}") for v in demo["volumes"]), "the report's folder is mounted"


def test_readme_says_docker_does_not_run_here():
    text = (DOCKER / "README.md").read_text()
    assert "cannot run on the machines this project is developed on" in text
    for command in ("docker build -f docker/Dockerfile ", "docker build -f docker/Dockerfile.cuda", "docker compose"):
        assert command in text


def test_the_ray_image_adds_the_ray_extra_to_the_cpu_image_with_the_tested_constraints():
    ins = dockerfile("Dockerfile.ray")
    assert [i.args for i in ins if i.keyword == "FROM"] == ["${BASE}"]
    assert any(i.args == "BASE=wit:cpu" for i in ins if i.keyword == "ARG")
    assert not copy_sources(ins), "it builds on the CPU image's /opt/wit, copying nothing"
    runs = [i.args for i in ins if i.keyword == "RUN"]
    assert any(re.search(r'pip install -c constraints\.txt "\.\[ray\]"', r) for r in runs)
    assert json.loads(next(i.args for i in ins if i.keyword == "ENTRYPOINT")) == ["wit"]


def test_the_rayjob_runs_the_data_stages_on_the_ray_image_with_the_pinned_ray():
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:2] == ["wit", "run"] and entry[entry.index("--executor") + 1] == "ray"
    pinned = re.search(r"^ray==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned  # driver and cluster run the same Ray
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container["image"] == "wit:ray"
        assert {"secretRef": {"name": "wit-s3"}} in container["envFrom"]  # storage credentials on every node
    head = cluster["headGroupSpec"]["template"]["spec"]
    mounted = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert entry[2].startswith(mounted["pipeline"] + "/")
