"""Test-session settings. Under pytest-xdist (``-n 2``, README's test command) every worker gets one
torch thread: two workers with torch's default of one thread per core oversubscribe a 2-core machine,
and torch's intra-op thread pool then spends most of its time waiting (measured on the loaded 2-core
development machine: the default suite took 13 min with torch's default threads, 63 s with one per worker)."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER") is not None or os.environ.get("DIFFSTEER_TEST_THREADS"):
    torch.set_num_threads(int(os.environ.get("DIFFSTEER_TEST_THREADS", "1")))
