"""Run-time compilation and launch of the CUDA backend's kernels (CuPy RawModule over NVRTC).

The CUDA backend (``PAGEDATTN_BACKEND=cuda``, or the automatic fallback when Triton cannot run) keeps
its kernels as CUDA C++ under ``pagedattn/ops/cuda_src/``. :func:`get_kernel` compiles one kernel of a
source file with NVRTC, once per (source, kernel, defines, device), and :func:`launch` runs it on
torch's current stream with torch's tensors as arguments: no copies, no second allocator, and it
works while torch captures a CUDA graph (compile every kernel once before capturing).

CuPy is imported lazily, so the package imports on machines without it; cuda-python
(``cuda.bindings``) is optional too: device and memory queries use it when it is installed and
``cupy.cuda.runtime`` otherwise.
"""

from __future__ import annotations

import functools
import re
import threading
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

#: Where the kernels' sources live (shipped as package data).
SOURCE_DIR = Path(__file__).resolve().with_name("cuda_src")
#: Options of every compilation (the device's architecture is added by CuPy).
BASE_OPTIONS = ("-std=c++17",)

_KERNELS: dict[tuple, Any] = {}
_STREAMS: dict[tuple[int, int], Any] = {}
_LOCK = threading.Lock()
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _cupy():
    import cupy  # lazily: only the CUDA backend needs it

    return cupy


@functools.lru_cache(maxsize=None)
def _probe() -> tuple[bool, str]:
    try:
        cupy = _cupy()
    except Exception as exc:  # ImportError, or a CuPy built for another CUDA failing at import
        return False, f"cupy is not importable ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"cupy cannot reach a CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "cupy sees no CUDA device"
    return True, ""


def available() -> tuple[bool, str]:
    """``(True, "")`` when CuPy imports and a CUDA device is visible, else ``(False, reason)``."""
    return _probe()


def _option(name: str, value: Union[int, str]) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"defines: {name!r} is not a C identifier")
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, (int, str)):
        raise TypeError(f"defines[{name!r}] must be an int or a str, got {type(value).__name__}")
    return f"-D{name}={value}"


def kernel_key(source_name: str, kernel_name: str, defines: Optional[dict[str, Union[int, str]]],
               device_index: int) -> tuple:
    """The cache key of a compiled kernel: two different ``defines`` never share a binary."""
    items = tuple(sorted((k, int(v) if isinstance(v, bool) else v) for k, v in (defines or {}).items()))
    return source_name, kernel_name, items, device_index


def compile_options(defines: Optional[dict[str, Union[int, str]]]) -> tuple[str, ...]:
    """NVRTC options: the base options, the include path of ``cuda_src/`` and one ``-D`` per define."""
    defs = tuple(_option(k, v) for k, v in sorted((defines or {}).items()))
    return BASE_OPTIONS + (f"-I{SOURCE_DIR}",) + defs


def read_source(source_name: str) -> str:
    path = SOURCE_DIR / source_name
    if path.parent != SOURCE_DIR or not path.is_file():
        raise FileNotFoundError(f"no CUDA source {source_name!r} in {SOURCE_DIR}")
    return path.read_text()


def get_kernel(source_name: str, kernel_name: str, defines: Optional[dict[str, Union[int, str]]] = None,
               device_index: Optional[int] = None):
    """The ``cupy.RawKernel`` ``kernel_name`` (an ``extern "C" __global__`` function) of
    ``cuda_src/<source_name>`` compiled with ``defines``, for ``device_index`` (default: torch's
    current device). Compiled once and cached; a compile error raises ``RuntimeError`` naming the kernel.
    """
    if device_index is None:
        device_index = torch.cuda.current_device()
    key = kernel_key(source_name, kernel_name, defines, device_index)
    kernel = _KERNELS.get(key)
    if kernel is not None:
        return kernel
    with _LOCK:
        kernel = _KERNELS.get(key)
        if kernel is None:
            kernel = _compile(source_name, kernel_name, defines, device_index)
            _KERNELS[key] = kernel
    return kernel


def _compile(source_name: str, kernel_name: str, defines, device_index: int):
    options = compile_options(defines)
    code = read_source(source_name)
    cupy = _cupy()
    try:
        with cupy.cuda.Device(device_index):
            module = cupy.RawModule(code=code, options=options)
            kernel = module.get_function(kernel_name)  # compiles and loads now, not at the first launch
    except Exception as exc:
        raise RuntimeError(f"pagedattn cuda backend: compiling kernel {kernel_name!r} of {source_name} with "
                           f"{' '.join(options[2:]) or 'no defines'} for cuda:{device_index} failed: "
                           f"{type(exc).__name__}: {exc}") from exc
    return kernel


def _arg(position: int, value, device: Optional[torch.device]):
    if isinstance(value, torch.Tensor):
        if value.device.type != "cuda":
            raise ValueError(f"kernel argument {position} must be a CUDA tensor, got one on {value.device}")
        if device is not None and value.device != device:
            raise ValueError(f"kernel argument {position} is on {value.device}, the launch on {device}")
        return np.uint64(value.data_ptr())
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value
    if value is None:
        raise TypeError(f"kernel argument {position} is None: pass a tensor or a numpy scalar")
    if isinstance(value, (bool, int, float)):
        raise TypeError(f"kernel argument {position} is a Python {type(value).__name__} ({value!r}): wrap it in "
                        "a numpy scalar (np.int32, np.int64, np.float32, ...) so its C type is explicit")
    raise TypeError(f"kernel argument {position} must be a torch.Tensor or a numpy scalar, "
                    f"got {type(value).__name__}")


def convert_args(args: tuple) -> tuple[tuple, Optional[torch.device]]:
    """The kernel arguments as CuPy takes them, and the device of their tensors (``None`` without any).

    Tensors become ``np.uint64`` data pointers (all on one CUDA device), numpy scalars stay as they
    are; anything else raises ``TypeError`` (``ValueError`` for a tensor elsewhere) naming its position.
    """
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple, got {type(args).__name__}")
    device = None
    converted = []
    for i, a in enumerate(args):
        converted.append(_arg(i, a, device))
        if device is None and isinstance(a, torch.Tensor):
            device = a.device
    return tuple(converted), device


def _dims(name: str, dims) -> tuple[int, int, int]:
    if not isinstance(dims, tuple) or len(dims) != 3 or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ValueError(f"{name} must be a tuple of three ints >= 0, got {dims!r}")
    return tuple(int(d) for d in dims)


class _StreamHandle:
    """A raw ``cudaStream_t`` handle speaking the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return 0, self.ptr


def external_stream(stream: torch.cuda.Stream):
    """A CuPy stream over torch's ``stream`` (cached per handle; it owns nothing)."""
    key = (stream.cuda_stream, stream.device.index)
    wrapped = _STREAMS.get(key)
    if wrapped is None:
        if len(_STREAMS) >= 256:
            _STREAMS.clear()
        cuda = _cupy().cuda
        if hasattr(cuda.Stream, "from_external"):  # CuPy >= 14 (ExternalStream is deprecated there)
            wrapped = cuda.Stream.from_external(_StreamHandle(stream.cuda_stream))
        else:
            wrapped = cuda.ExternalStream(stream.cuda_stream, stream.device.index)
        _STREAMS[key] = wrapped
    return wrapped


def launch(kernel, grid: tuple[int, int, int], block: tuple[int, int, int], args: tuple,
           shared_mem: int = 0) -> None:
    """Launch ``kernel`` on torch's current stream of its tensors' device (graph capture safe).

    ``args``: tensors (passed as device pointers) and numpy scalars; a Python int, float or bool or
    ``None`` raises ``TypeError`` naming its position. A grid with a zero dimension launches nothing.
    """
    grid, block = _dims("grid", grid), _dims("block", block)
    if not isinstance(shared_mem, (int, np.integer)) or isinstance(shared_mem, bool) or shared_mem < 0:
        raise ValueError(f"shared_mem must be an int >= 0, got {shared_mem!r}")
    converted, device = convert_args(args)
    if 0 in block:
        raise ValueError(f"block must have three dims >= 1, got {block}")
    if 0 in grid:
        return
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cupy = _cupy()
    with cupy.cuda.Device(device.index):
        # the kernel's limit on dynamic shared memory starts at 48 KB less its static arrays: raise it (the
        # opt-in) whenever a launch asks for more, not only above 48 KB
        if shared_mem > 0 and kernel.max_dynamic_shared_size_bytes < shared_mem:
            kernel.max_dynamic_shared_size_bytes = int(shared_mem)
        kernel(grid, block, converted, shared_mem=int(shared_mem),
               stream=external_stream(torch.cuda.current_stream(device)))


# ---------------------------------------------------------------------------------------------
# device and memory queries (cuda-python when installed, else cupy.cuda.runtime)
# ---------------------------------------------------------------------------------------------

def _cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        return None
    return runtime


def _check(result, what: str):
    err, *values = result
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


@functools.lru_cache(maxsize=None)
def device_attributes(device_index: int) -> dict[str, int]:
    """``multiprocessor_count``, ``max_shared_memory_per_block_optin`` (bytes), ``compute_capability``
    (e.g. 90) and ``warp_size`` of a device."""
    rt = _cudart()
    if rt is not None:
        props = _check(rt.cudaGetDeviceProperties(device_index), "cudaGetDeviceProperties")
        return {"multiprocessor_count": props.multiProcessorCount,
                "max_shared_memory_per_block_optin": props.sharedMemPerBlockOptin,
                "compute_capability": props.major * 10 + props.minor, "warp_size": props.warpSize}
    props = _cupy().cuda.runtime.getDeviceProperties(device_index)
    return {"multiprocessor_count": props["multiProcessorCount"],
            "max_shared_memory_per_block_optin": props["sharedMemPerBlockOptin"],
            "compute_capability": props["major"] * 10 + props["minor"], "warp_size": props["warpSize"]}


def memory_info(device_index: int) -> tuple[int, int]:
    """``(free, total)`` bytes of a device's memory."""
    rt = _cudart()
    if rt is not None:
        previous = _check(rt.cudaGetDevice(), "cudaGetDevice")
        _check(rt.cudaSetDevice(device_index), "cudaSetDevice")
        try:
            free, total = _check(rt.cudaMemGetInfo(), "cudaMemGetInfo")
        finally:
            rt.cudaSetDevice(previous)
        return int(free), int(total)
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        free, total = cupy.cuda.runtime.memGetInfo()
    return int(free), int(total)
