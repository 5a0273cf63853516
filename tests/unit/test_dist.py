"""Slurm node lists: `scontrol show hostnames` where it exists, and our expansion of the same lists
where it does not."""

import os
import shutil
import subprocess

import pytest

from pipeline import ArpipeError
from pipeline.train.dist import expand_hostlist, slurm_hosts, slurm_master

TRICKY = {
    "gpu-[01-04]-ib,cpu[1,3-5]": ["gpu-01-ib", "gpu-02-ib", "gpu-03-ib", "gpu-04-ib", "cpu1", "cpu3", "cpu4", "cpu5"],
    "gpu[007-009,012],cpu1": ["gpu007", "gpu008", "gpu009", "gpu012", "cpu1"],
    "rack[0-1]_blade[08-09]": ["rack0_blade08", "rack0_blade09", "rack1_blade08", "rack1_blade09"],
    "x[8-11],n-3": ["x8", "x9", "x10", "x11", "n-3"],
    "node1": ["node1"],
}


@pytest.fixture
def no_scontrol(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no scontrol


@pytest.mark.parametrize("nodelist", TRICKY)
def test_without_scontrol_our_expansion_is_used(nodelist, no_scontrol):
    assert slurm_hosts(nodelist) == TRICKY[nodelist]


def test_a_bad_node_list_is_one_clear_error():
    with pytest.raises(ArpipeError, match=r"cannot read the Slurm node list 'gpu\[a-b\]'"):
        expand_hostlist("gpu[a-b]")


@pytest.mark.parametrize("nodelist", TRICKY)
def test_scontrol_and_our_expansion_agree(nodelist, tmp_path, monkeypatch):
    if not shutil.which("scontrol"):
        if os.environ.get("ARPIPE_REQUIRE_SLURM") == "1":
            pytest.fail("scontrol is not installed")
        pytest.skip("scontrol is not installed (apt-get install slurm-client)")
    conf = tmp_path / "slurm.conf"  # `show hostnames` reads a config but asks no controller
    conf.write_text("ClusterName=test\nSlurmctldHost=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    scontrol = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    if scontrol.stdout.split():
        assert scontrol.stdout.split() == TRICKY[nodelist]
    else:  # Slurm 22.05 wants a range at the end of a name: it refuses 'gpu-[01-04]-ib' (and never writes one)
        assert "Invalid hostlist" in scontrol.stdout + scontrol.stderr and "]-" in nodelist
    assert slurm_hosts(nodelist) == TRICKY[nodelist]


def test_slurm_master_is_the_first_host_with_its_suffix(no_scontrol, monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "rack[3-4]_blade[08-09]")
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    assert slurm_master() == ("rack3_blade08", str(20000 + 12 * 7))
