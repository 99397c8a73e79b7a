import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch

# One thread: the sizes here are small, and OpenMP threads that wait on a busy second core make
# small ops 100x slower (measured on the 2-core machines this suite runs on).
torch.set_num_threads(1)
