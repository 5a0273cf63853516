"""The Docker image cannot be built here; check that its install steps match pyproject.toml."""

import re
import tomllib

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
        packages = [w for w in line.split() if not w.startswith("-") and w != "\\"]
        assert packages == ["."], f"pip install {line!r} names packages that pyproject.toml should own"


def test_copied_paths_exist_and_entrypoint_is_the_cli():
    for sources in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M):
        for source in sources.split():
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    assert 'ENTRYPOINT ["arpipe"]' in DOCKERFILE
    assert PYPROJECT["project"]["scripts"]["arpipe"] == "pipeline.cli:main"
    assert "launch" in DOCKERFILE  # arpipe submit needs launch/slurm beside the package
