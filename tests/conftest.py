"""Put the repo root on sys.path so tests import the flat top-level modules (model, rollout, ...)
under a bare `pytest` too, not only under `python -m pytest`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# One intra-op thread: the test models are tiny, so threads only add fork/join overhead, and on
# a shared 2-core machine (another process on a core) 2 threads made this suite ~50x slower.
torch.set_num_threads(1)
