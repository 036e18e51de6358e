"""Test-session settings: one torch thread.

The suite is thousands of tiny ops; on a shared 2-core machine torch's default two intra-op
threads contend with everything else and slowed the suite from ~100 s to ~600 s. Subprocess
tests (the console script, DDP ranks) set their own threads.
"""

import torch

torch.set_num_threads(1)
