"""tilemoe: the library of Chapter 10, Tile-Aware MoE Accelerators.

    import tilemoe
    y = tilemoe.moe_forward(x, router_weight, w_gate_up, w_down, top_k=2)   # backend="auto"
    ref = tilemoe.reference_moe(x, router_weight, w_gate_up, w_down, top_k=2)

Modules: layer (``OptimizedMoELayer``, the nn.Module), hf (Hugging Face MoE blocks), reference (ground truth), routing (top-k, metadata, capacity, statistics), backends
(ways of running the experts), triton (the fused kernels), graphs (the CUDA-graph decode path),
rounding (tile-aware token rounding), presets (model shapes), bench (timing and recording), cuda
(the compiled extension), checks (input validation).
"""

from . import graphs
from .backends import BACKENDS, available_backends
from .layer import OptimizedMoELayer
from .moe import moe_forward
from .presets import PRESETS, MoEConfig, get_preset
from .reference import TOLERANCE, reference_moe, rel_error
from .rounding import round_routing
from .routing import Routing, load_balancing_loss, load_stats, route, router_logits

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "MoEConfig", "OptimizedMoELayer", "PRESETS", "Routing", "TOLERANCE", "available_backends", "get_preset",
    "load_balancing_loss", "load_stats", "moe_forward", "reference_moe", "rel_error", "round_routing", "route",
    "router_logits",
]
