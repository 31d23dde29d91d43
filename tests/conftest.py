import os

# Tests run on CPU; keep BLAS to one thread per process so the multi-process tests don't thrash 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (after the thread settings above)

# Triton decides when a kernel is defined (at import of slimtrain.kernels) whether it runs compiled or
# in its CPU interpreter, so without a GPU the interpreter must be on before any test imports slimtrain.
# Only tests that force the Triton backend use it; everything else dispatches to the torch references.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
