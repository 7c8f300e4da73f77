"""Loss tests run on tiny tensors: one thread keeps them fast and deterministic on small CI machines."""

import torch

torch.set_num_threads(1)
