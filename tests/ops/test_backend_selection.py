"""Backend choice (CPU, no GPU needed): the environment variable, set_backend, resolution per device,
the error when the cuda backend cannot run, and auto's one-time fallback from Triton to the CUDA backend."""

import logging

import pytest
import torch
from triton.runtime.errors import PTXASError

from pagedattn.ops import config, cuda_cache, dispatch, launchers

CUDA0 = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def fresh_config():
    """Each test starts from auto with nothing probed, and leaves the process as it found it."""
    saved = dict(config._state), dict(config._triton_status), config._fallback_warned[0]
    config._state["backend"] = "auto"
    config._triton_status.clear()
    config._fallback_warned[0] = False
    yield
    config._state.update(saved[0])
    config._triton_status.clear()
    config._triton_status.update(saved[1])
    config._fallback_warned[0] = saved[2]


def cuda_backend(monkeypatch, ok: bool, reason: str = "cupy is not importable (test)"):
    monkeypatch.setattr("pagedattn.ops.cuda_runtime.available", lambda: (ok, "" if ok else reason))


@pytest.mark.parametrize("value,expected", [("", "auto"), ("auto", "auto"), (" CUDA ", "cuda"), ("Triton", "triton"),
                                            ("reference", "reference")])
def test_env_backend_parsing(monkeypatch, value, expected):
    monkeypatch.setenv("PAGEDATTN_BACKEND", value)
    assert config._env_backend() == expected


def test_env_backend_rejects_unknown_names(monkeypatch):
    monkeypatch.setenv("PAGEDATTN_BACKEND", "cupy")
    with pytest.raises(ValueError, match="PAGEDATTN_BACKEND must be one of .*'cuda'"):
        config._env_backend()


def test_backends_listed_and_exported():
    import pagedattn.ops as ops

    assert ops.BACKENDS == ("auto", "triton", "cuda", "reference")
    assert ops.resolve_backend is config.resolve_backend


def test_set_backend_cuda_without_cupy_raises_naming_the_setting(monkeypatch):
    cuda_backend(monkeypatch, False)
    with pytest.raises(RuntimeError) as info:
        config.set_backend("cuda")
    message = str(info.value)
    assert "PAGEDATTN_BACKEND" in message and "set_backend" in message and "cupy is not importable (test)" in message
    assert config.get_backend() == "auto"  # unchanged


def test_cupy_is_not_installed_in_the_test_environment():
    """CI runs without CuPy: the real probe says so (the cuda GPU tests then skip with this reason)."""
    from pagedattn.ops import cuda_runtime

    ok, reason = cuda_runtime.available()
    if ok:
        pytest.skip("CuPy and a GPU are here")
    assert reason


def test_cuda_backend_from_the_environment_raises_at_the_first_cuda_op(monkeypatch):
    cuda_backend(monkeypatch, False)
    config._state["backend"] = "cuda"  # as PAGEDATTN_BACKEND=cuda at import
    with pytest.raises(RuntimeError, match=r"PAGEDATTN_BACKEND=cuda .* cupy is not importable \(test\)"):
        config.resolve_backend(CUDA0)
    assert config.resolve_backend(torch.device("cpu")) == "reference"


def test_resolution_per_backend_and_device(monkeypatch):
    cuda_backend(monkeypatch, True)
    monkeypatch.setattr(config, "probe_triton", lambda index: "")
    cpu = torch.device("cpu")
    expected = {"auto": ("reference", "triton"), "triton": ("triton", "triton"), "cuda": ("reference", "cuda"),
                "reference": ("reference", "reference")}
    for backend, (on_cpu, on_cuda) in expected.items():
        config.set_backend(backend)
        assert (config.resolve_backend(cpu), config.resolve_backend(CUDA0)) == (on_cpu, on_cuda), backend
    config.set_backend("auto")


def test_auto_falls_back_to_cuda_when_triton_cannot_run_with_one_warning(monkeypatch, caplog):
    cuda_backend(monkeypatch, True)
    probed = []
    monkeypatch.setattr(config, "probe_triton", lambda index: probed.append(index) or "Triton is not importable (test)")
    with caplog.at_level(logging.WARNING, logger="pagedattn"):
        for device in (CUDA0, CUDA0, torch.device("cuda", 1), CUDA0):
            assert config.resolve_backend(device) == "cuda"
    assert probed == [0, 1]  # probed once per device
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Triton is not importable (test)" in warnings[0].getMessage()
    assert "CUDA backend" in warnings[0].getMessage()


def test_auto_without_triton_or_cupy_raises_naming_both(monkeypatch):
    cuda_backend(monkeypatch, False, "no cupy (test)")
    monkeypatch.setattr(config, "probe_triton", lambda index: "no triton (test)")
    with pytest.raises(RuntimeError, match=r"no backend can run on cuda:0: no triton \(test\).*no cupy \(test\)"):
        config.resolve_backend(CUDA0)


def test_probe_triton_reports_a_missing_driver_here():
    """On this machine Triton imports but has no CUDA driver (it runs interpreted): the probe says so."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert "Triton" in config.probe_triton(0)


def record(calls, name):
    def fake(*args):
        calls.append((name, args))
    return fake


def failing(exc):
    def fake(*args):
        raise exc
    return fake


def test_a_triton_compile_failure_reruns_the_op_on_cuda_once_warned(monkeypatch, caplog):
    cuda_backend(monkeypatch, True)
    monkeypatch.setattr(config, "probe_triton", lambda index: "")
    calls = []
    monkeypatch.setattr(launchers, "reshape_and_cache", failing(PTXASError("sm_00 is not supported (test)")))
    monkeypatch.setattr(cuda_cache, "reshape_and_cache", record(calls, "cuda"))
    with caplog.at_level(logging.WARNING, logger="pagedattn"):
        assert dispatch.run_kernels(CUDA0, "reshape_and_cache", 1, 2)
        assert dispatch.run_kernels(CUDA0, "reshape_and_cache", 3)  # straight to cuda now
    assert calls == [("cuda", (1, 2)), ("cuda", (3,))]
    assert config.resolve_backend(CUDA0) == "cuda"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "failed to compile" in warnings[0] and "sm_00 is not supported" in warnings[0]


def test_other_triton_errors_and_an_explicit_triton_backend_do_not_fall_back(monkeypatch):
    cuda_backend(monkeypatch, True)
    monkeypatch.setattr(config, "probe_triton", lambda index: "")
    calls = []
    monkeypatch.setattr(cuda_cache, "copy_blocks", record(calls, "cuda"))
    monkeypatch.setattr(launchers, "copy_blocks", failing(ValueError("a bug, not the device")))
    with pytest.raises(ValueError, match="a bug"):
        dispatch.run_kernels(CUDA0, "copy_blocks", 1)
    config.set_backend("triton")
    monkeypatch.setattr(launchers, "copy_blocks", failing(PTXASError("no sm_00")))
    with pytest.raises(PTXASError):
        dispatch.run_kernels(CUDA0, "copy_blocks", 1)
    assert calls == [] and config._triton_status == {0: ""}


def test_dispatch_tables_name_every_kernel_op():
    ops = {"paged_decode", "paged_prefill", "reshape_and_cache", "copy_blocks"}
    assert set(dispatch.KERNEL_MODULES["triton"]) == set(dispatch.KERNEL_MODULES["cuda"]) == ops
    assert dispatch.kernel_impl("cuda", "reshape_and_cache") is cuda_cache.reshape_and_cache
    assert dispatch.kernel_impl("triton", "paged_decode") is launchers.paged_decode


def test_reference_backend_returns_false_to_run_the_reference():
    config.set_backend("reference")
    assert dispatch.run_kernels(CUDA0, "paged_decode") is False


def test_compile_errors_are_recognized_by_type_or_by_triton_s_compiler_frames():
    assert config.is_triton_compile_error(PTXASError("x"))
    code = compile("raise RuntimeError('PassManager::run failed')", "/site-packages/triton/compiler/compiler.py",
                   "exec")
    try:
        exec(code)
    except RuntimeError as exc:
        assert config.is_triton_compile_error(exc)
    try:
        raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
    except RuntimeError as exc:
        assert not config.is_triton_compile_error(exc)
