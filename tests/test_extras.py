"""The GPU extras bring every CUDA library but the driver, all of one CUDA major.

``cupy-cuda12x`` alone assumes a CUDA toolkit is already installed; on a
workstation with just the NVIDIA driver, ``pip install 'backprop-xp[cuda12]'``
must bring the toolkit wheels too (CuPy's ``[ctk]`` extra), nvmath-python's
libraries (its ``[cu12]`` extra) and, by name, the toolkit parts this package
calls: cuBLAS, the runtime and NVRTC. A wheel of the other CUDA major would
load next to them and fail, so none may be asked for. Read from the installed
package's metadata: what pip actually resolves.
"""

from __future__ import annotations

import importlib.metadata

import pytest
from packaging.requirements import Requirement

GPU_EXTRAS = {"cuda12": 12, "cuda13": 13}


def extra_requirements(extra: str) -> dict[str, Requirement]:
    """The installed backprop-xp's requirements under ``extra``, by package name."""
    found = {}
    for line in importlib.metadata.requires("backprop-xp") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and requirement.marker.evaluate({"extra": extra}):
            found[requirement.name] = requirement
    assert found, f"backprop-xp's metadata has no [{extra}] extra: reinstall it (pip install -e .)"
    return found


def admits(requirement: Requirement, major: int) -> bool:
    """Whether the requirement accepts some release of CUDA ``major`` (x.0 or a later x.y)."""
    return any(requirement.specifier.contains(f"{major}.{minor}") for minor in (0, 2, 9))


@pytest.mark.parametrize("extra", GPU_EXTRAS)
def test_gpu_extra_brings_the_cuda_libraries_of_its_own_major(extra):
    major = GPU_EXTRAS[extra]
    other = 25 - major  # 12 <-> 13
    wants = extra_requirements(extra)
    message = f"[{extra}] asks for {sorted(map(str, wants.values()))}"

    toolkit = wants.get("cuda-toolkit")
    assert toolkit is not None, message
    assert {"cublas", "cudart", "nvrtc"} <= toolkit.extras, message  # what this package itself calls
    assert admits(toolkit, major) and not admits(toolkit, other), message

    cupy = wants.get(f"cupy-cuda{major}x")
    assert cupy is not None and "ctk" in cupy.extras, message  # CuPy's own toolkit wheels
    assert not cupy.specifier.contains("13.6.0"), message  # CuPy 13 has no [ctk] extra: pip would drop it silently

    nvmath = wants.get("nvmath-python")
    assert nvmath is not None and nvmath.extras == {f"cu{major}"}, message  # the cuBLAS its bindings load

    bindings = wants.get("cuda-bindings")
    assert bindings is not None and admits(bindings, major) and not admits(bindings, other), message

    assert f"cupy-cuda{other}x" not in wants, message
    for requirement in wants.values():
        assert f"cu{other}" not in requirement.extras, message
