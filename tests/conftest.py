"""Session-wide test setup.

Without CUDA, Triton kernels (the fused KoPE attention) run in Triton's CPU interpreter. Triton reads
``TRITON_INTERPRET`` when it is first imported, which any test (``torch.compile`` included) may cause, so it is set
here, before any test module is collected.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
