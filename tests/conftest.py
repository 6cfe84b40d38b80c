"""Test set-up shared by every test file.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set
here, at collection time, whenever no CUDA device is present: on a CPU machine the Triton
kernels then run under the interpreter; on a GPU they run compiled.
"""
import os

def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One intra-op thread: the tests' tiny models cannot use two, and a second thread beside other
# work (the suite's subprocesses, a neighbour on a shared machine) slows them many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # a per-test time limit where pytest-timeout is installed (the test extra); a plain
    # install runs the suite without it
    if config.pluginmanager.hasplugin("timeout") and not getattr(config.option, "timeout", None):
        config.option.timeout = 900
    if config.pluginmanager.hasplugin("benchmark"):
        config.option.benchmark_disable = True   # benchmark fixtures run their function once
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped otherwise)")
    config.addinivalue_line("markers", "slow: longer tests (still run in make test)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run; a failing test reports its seed (replay with
    PCR_TEST_SEED=<seed>)."""
    env = os.environ.get("PCR_TEST_SEED")
    seed = int(env) if env else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("torch_seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "torch_seed":
                report.sections.append(("seed", f"replay with PCR_TEST_SEED={value}"))


try:  # pytest-benchmark (the test extra) provides `benchmark`; a plain install calls the function once
    import pytest_benchmark  # noqa: F401
except ImportError:
    @pytest.fixture
    def benchmark():
        return lambda fn, *args, **kwargs: fn(*args, **kwargs)
