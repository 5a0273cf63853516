"""The Docker image cannot be built here; check that its install steps match pyproject.toml."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

from packaging.requirements import Requirement

from tests.conftest import REPO

DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_base_image_torch_satisfies_pyproject():
    tag = re.search(r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)-cuda", DOCKERFILE, re.M)
    assert tag, "the base image should be a pytorch/pytorch CUDA tag"
    torch = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch"))
    assert torch.specifier.contains(tag.group(1)), f"base image torch {tag.group(1)} vs pyproject {torch}"


def test_dependencies_come_from_pyproject_only():
    installs = re.findall(r"pip install ([^\n&]*)", DOCKERFILE)
    assert installs, "the image must pip install arpipe"
    for line in installs:
        packages = [w for w in re.sub(r"-c \S+", "", line).split() if not w.startswith("-") and w != "\\"]
        assert packages == ["."], f"pip install {line!r} names packages that pyproject.toml should own"


def test_image_installs_the_tested_versions_and_keeps_its_torch(tmp_path):
    """The image's constraints are constraints.txt with its torch pin swapped for the torch at hand
    (run here: the Dockerfile's own command, with this machine's torch standing in for the image's)."""
    written = re.search(r"RUN (\{ .*? \})\s*\\\s*> (\S+)", DOCKERFILE, re.S)
    assert written, "the image should write its constraints file with one { …; } > FILE command"
    assert re.search(rf"pip install .*-c {re.escape(written.group(2))} -e \.", DOCKERFILE)
    assert re.search(r"^COPY .*\bconstraints\.txt\b", DOCKERFILE, re.M)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    made = subprocess.run(["bash", "-c", written.group(1)], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True).stdout.splitlines()
    pinned = (REPO / "constraints.txt").read_text().splitlines()
    assert made == [line for line in pinned if not line.startswith("torch==")] + [f"torch=={torch.__version__}"]
    assert any(line.startswith("torch==") for line in pinned) and "deepspeed==" in "\n".join(made)


def test_copied_paths_exist_and_entrypoint_is_the_cli():
    for sources in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M):
        for source in sources.split():
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    assert 'ENTRYPOINT ["arpipe"]' in DOCKERFILE
    assert PYPROJECT["project"]["scripts"]["arpipe"] == "pipeline.cli:main"
    assert "launch" in DOCKERFILE  # arpipe submit needs launch/slurm beside the package
