"""arsr: pipeline-as-code for autoregressive image super-resolution."""

import os

from arsr.proc import WAIT_POLICY

# Set before anything imports torch: OpenMP reads its wait policy once, when torch loads it, and
# every arsr process (a stage, a torchrun rank, a pool worker) imports this package first. Threads
# then sleep between parallel regions instead of spinning on CPUs another process needs (see
# arsr.proc.WAIT_POLICY); a policy set by the user is kept.
os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
