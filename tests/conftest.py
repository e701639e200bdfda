import sys
from pathlib import Path

import torch

# Tests run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The test models are tiny: one thread avoids oversubscription (which makes them ~100x slower on a busy
# 2-core machine) and keeps float results independent of the thread count.
torch.set_num_threads(1)
