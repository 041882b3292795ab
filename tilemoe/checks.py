"""Input checks: every public entry point validates here, before any kernel runs.

Every failure names the argument, what was expected and what came, in one format:
``"<argument>: expected <expected>, got <actual>"``. A type problem raises TypeError, a
value/shape/device problem raises ValueError.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(name: str, expected: str, actual: object, exc: type[Exception] = ValueError) -> None:
    """Raise ``exc`` with the chapter's one error format."""
    raise exc(f"{name}: expected {expected}, got {actual}")


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(name, "a torch.Tensor", type(t).__name__, TypeError)
    return t


def check_float_tensor(name: str, t: object) -> torch.Tensor:
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        fail(name, "a floating dtype (float16, bfloat16, float32, float64)", t.dtype, TypeError)
    return t


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], labels: str) -> None:
    """``labels`` spells the expected shape, e.g. "[E, 2I, H] = [8, 64, 32]"."""
    if tuple(t.shape) != tuple(shape):
        fail(name, f"shape {labels}", list(t.shape))


def check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        fail(name, f"device {device} (the device of x)", t.device)


def check_contiguous(name: str, t: torch.Tensor, hint: str = "") -> None:
    if not t.is_contiguous():
        fail(name, "a contiguous tensor" + hint, f"strides {t.stride()}")


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """An int (bools refused) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(name, "an int", type(value).__name__, TypeError)
    if low is not None and value < low:
        fail(name, f"an int >= {low}", value)
    if high is not None and value > high:
        fail(name, f"an int <= {high}", value)
    return value


def check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(name, "a number", type(value).__name__, TypeError)
    if not (math.isfinite(value) and value > 0):
        fail(name, "a finite number > 0", value)
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        fail(name, "one of " + ", ".join(repr(c) for c in choices), repr(value))
    return value


def check_moe_weights(
    x: torch.Tensor,
    router_weight: object,
    w_gate_up: object,
    w_down: object,
    top_k: object,
) -> tuple[int, int, int, int]:
    """Check the core contract's tensors; return (H, I, E, top_k).

    x: [..., H]  router_weight: [E, H]  w_gate_up: [E, 2I, H]  w_down: [E, H, I].
    """
    check_float_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        fail("x", "shape [..., H] with H >= 1", list(x.shape))
    hidden = x.shape[-1]
    check_float_tensor("router_weight", router_weight)
    if router_weight.dim() != 2 or router_weight.shape[1] != hidden or router_weight.shape[0] == 0:
        fail("router_weight", f"shape [E, H] with E >= 1 and H = {hidden}", list(router_weight.shape))
    num_experts = router_weight.shape[0]
    check_same_device("router_weight", router_weight, x.device)

    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_float_tensor(name, w)
        check_same_device(name, w, x.device)
        if w.dtype != x.dtype:
            fail(name, f"dtype {x.dtype} (the dtype of x)", w.dtype, TypeError)
    if w_gate_up.dim() != 3 or w_gate_up.shape[1] % 2 or w_gate_up.shape[1] == 0:
        fail("w_gate_up", f"shape [E, 2I, H] = [{num_experts}, 2I, {hidden}] with I >= 1", list(w_gate_up.shape))
    ffn = w_gate_up.shape[1] // 2
    check_shape("w_gate_up", w_gate_up, (num_experts, 2 * ffn, hidden), f"[E, 2I, H] = [{num_experts}, {2 * ffn}, {hidden}]")
    check_shape("w_down", w_down, (num_experts, hidden, ffn), f"[E, H, I] = [{num_experts}, {hidden}, {ffn}]")
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_contiguous(name, w, " (call .contiguous() once, at load)")
    check_int("top_k", top_k, low=1, high=num_experts)
    return hidden, ffn, num_experts, top_k


def check_shared_experts(x: torch.Tensor, shared_gate_up: object, shared_down: object) -> None:
    """Shared experts: w [S, 2Is, H] and [S, H, Is], both given or both None."""
    if (shared_gate_up is None) != (shared_down is None):
        fail("shared_down" if shared_down is None else "shared_gate_up",
             "a tensor (shared_gate_up and shared_down come together)", None, TypeError)
    if shared_gate_up is None:
        return
    hidden = x.shape[-1]
    for name, w in (("shared_gate_up", shared_gate_up), ("shared_down", shared_down)):
        check_float_tensor(name, w)
        check_same_device(name, w, x.device)
        if w.dtype != x.dtype:
            fail(name, f"dtype {x.dtype} (the dtype of x)", w.dtype, TypeError)
        if w.dim() != 3:
            fail(name, "a 3-D tensor [S, ., .]", list(w.shape))
    num_shared, two_i, _ = shared_gate_up.shape
    if two_i % 2 or two_i == 0:
        fail("shared_gate_up", f"shape [S, 2Is, H] with H = {hidden}", list(shared_gate_up.shape))
    check_shape("shared_gate_up", shared_gate_up, (num_shared, two_i, hidden), f"[S, 2Is, H] = [{num_shared}, {two_i}, {hidden}]")
    check_shape("shared_down", shared_down, (num_shared, hidden, two_i // 2), f"[S, H, Is] = [{num_shared}, {hidden}, {two_i // 2}]")
