"""Test-session settings.

Threads: every test process gets one torch thread (``diffsteer.runtime.configure_threads``, the helper
every command uses): two xdist workers with torch's default of one thread per core oversubscribe a
2-core machine, and torch's intra-op thread pool then spends most of its time waiting (measured on the
loaded 2-core development machine: the default suite took 13 min with torch's default threads, 63 s with
one per worker). ``DIFFSTEER_TEST_THREADS=N`` overrides.

Cache: the tests never write into the user's cache. ``DIFFSTEER_CACHE`` points at a temporary folder
made for this test session (one per xdist worker) and removed at its end, so models trained by tests
(seconds each) are trained afresh in every session. ``DIFFSTEER_TEST_CACHE=DIR`` reuses DIR instead
(kept; for repeated local runs).

A test that runs a command in-process (``diffsteer.cli.main``) lets that command set torch's threads (the
image commands default to every usable core); ``_restore_threads`` sets them back after every test, so one
such test does not leave its worker oversubscribing the machine for the rest of the session."""
import os
import shutil
import tempfile

import pytest
import torch

from diffsteer.runtime import configure_threads

_THREADS = configure_threads(int(os.environ.get("DIFFSTEER_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    if torch.get_num_threads() != _THREADS:
        configure_threads(_THREADS)

_OWN_CACHE = None
if os.environ.get("DIFFSTEER_TEST_CACHE"):
    os.environ["DIFFSTEER_CACHE"] = os.environ["DIFFSTEER_TEST_CACHE"]
else:
    _OWN_CACHE = tempfile.mkdtemp(prefix="diffsteer-test-cache-")
    os.environ["DIFFSTEER_CACHE"] = _OWN_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
