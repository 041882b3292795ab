"""The chapter's Triton kernels: the fused MoE fast path behind backend "triton".

kernels.py holds the @triton.jit code (the tile schedule and the grouped GEMM with its fusions),
ops.py the host side that launches them, configs.py the tile configurations (a rule, and a tuned
table per GPU under tuned/), router.py the router (the tensor-core logits GEMM and the one-launch top-k) and metadata.py the routing
metadata (counts, offsets, the permutation) as a counting sort. Importing this package imports
Triton; with TRITON_INTERPRET=1 set before that, the kernels run on the CPU in Triton's
interpreter (float16/float32).
"""
