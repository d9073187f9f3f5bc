"""gradpool: train one language model across many untrusted machines."""

import os

# Threads that wait for parallel work sleep instead of spinning, unless the user says otherwise: read by
# OpenMP when torch loads it, so before anything imports torch. Where cores are shared (a coordinator
# beside its miners, several miners on one machine) spinning took 1.75x the time of an evaluation; alone
# on its cores the two are the same (BENCHMARKS.md, `make demo`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
