"""The ``gpu_backend`` fixture: runs a GPU test once per kernel backend (Triton, then CUDA/CuPy).

Use it in a module with ``pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_backend")]``
or as a test argument. The ``cuda`` run skips, naming the reason, where CuPy or a GPU is missing;
``PAGEDATTN_TEST_BACKENDS`` (comma-separated, default ``triton,cuda``) narrows the list.
"""

import os

import pytest

from pagedattn.ops import config, cuda_runtime

#: The kernel backends the GPU tests run on; ``PAGEDATTN_TEST_BACKENDS=cuda`` runs only the CUDA backend's.
GPU_BACKENDS = tuple(b.strip() for b in os.environ.get("PAGEDATTN_TEST_BACKENDS", "triton,cuda").split(",")
                     if b.strip())


def use_backend(backend: str):
    """Set ``backend`` for the duration of a test (skipping ``cuda`` where it cannot run); yields it."""
    if backend == "cuda":
        ok, reason = cuda_runtime.available()
        if not ok:
            pytest.skip(f"the cuda backend cannot run here: {reason}")
    previous = config.get_backend()
    config.set_backend(backend)
    try:
        yield backend
    finally:
        config._state["backend"] = previous


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request):
    yield from use_backend(request.param)
