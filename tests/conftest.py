import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny():
    from dori.models.builders import build_tiny_random

    return build_tiny_random(seed=0)


@pytest.fixture(scope="session")
def tiny_pixel():
    from dori.models.builders import build_tiny_random

    return build_tiny_random(seed=1, latent=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not suffer when other jobs share the cores); use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_BROWSER: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    """Record the outcome of @pytest.mark.browser tests (their call phase, or a skip in setup)."""
    if "browser" in report.keywords and (report.when == "call" or report.skipped):
        _BROWSER.append((report.nodeid.split("::")[-1], report.outcome))


def pytest_terminal_summary(terminalreporter):
    """Say in the log whether the browser tests ran (CI installs chromium; a skip is visible here)."""
    for name, outcome in _BROWSER:
        terminalreporter.write_line(f"browser test {name}: {outcome}")
