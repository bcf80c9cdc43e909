"""cuda_restore.phases: span bookkeeping, and cuda_init against a stub libcuda."""
from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

from cuda_restore import phases
from cuda_restore.phases import CudaInitError, Phases, cuda_init


def test_spans_record_add_up_and_survive_errors():
    p = Phases()
    with p.span("weights_to_gpu"):
        pass
    with pytest.raises(RuntimeError):
        with p.span("weights_to_gpu"):
            raise RuntimeError("OOM")
    p.record("cuda_init", 1.23456)
    items = p.items()
    assert list(items) == ["weights_to_gpu", "cuda_init"]
    assert items["cuda_init"] == 1.235 and items["weights_to_gpu"] >= 0
    assert p.reset() == items and p.items() == {}


def test_module_helper_uses_the_shared_phases():
    phases.PHASES.reset()
    with phases.gpu_phase("weights_to_gpu"):
        pass
    assert "weights_to_gpu" in phases.PHASES.items()
    phases.PHASES.reset()


def test_the_module_needs_only_the_standard_library():
    """The agent ships phases.py alone into /.runtimed: no project imports allowed."""
    tree = ast.parse(Path(phases.__file__).read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
            for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree)
             if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    assert mods <= {"__future__", "contextlib", "ctypes", "threading", "time", "collections"}


def test_cuda_init_without_a_driver_says_why():
    p = Phases()
    with pytest.raises(CudaInitError, match="cannot load libcuda-missing.so.1"):
        cuda_init("libcuda-missing.so.1", phases=p)
    assert "cuda_init" in p.items()                 # the failed attempt is still timed


STUB = """
int cuInit(unsigned int flags) { return flags == 0 ? STATUS : 1; }
int cuDeviceGetCount(int *n) { *n = 2; return 0; }
"""


@pytest.fixture
def stub_libcuda(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (needed to build a stub libcuda)")

    def build(status: int) -> str:
        src = tmp_path / f"stub{status}.c"
        src.write_text(STUB.replace("STATUS", str(status)))
        out = tmp_path / f"libcuda-stub{status}.so.1"
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
        return str(out)
    return build


def test_cuda_init_counts_devices(stub_libcuda):
    p = Phases()
    assert cuda_init(stub_libcuda(0), phases=p) == 2
    assert p.items()["cuda_init"] >= 0


def test_cuda_init_reports_the_cuda_error(stub_libcuda):
    with pytest.raises(CudaInitError, match="CUresult 100"):
        cuda_init(stub_libcuda(100), phases=Phases())
