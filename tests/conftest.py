"""Fixtures shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter. It is chosen when Triton compiles a
# kernel's decorator, i.e. when tilemoe.triton is first imported: set it before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tilemoe.grading import poisoned_memory  # noqa: E402


@pytest.fixture
def poison_uninitialized_memory():
    """Every torch.empty is NaN inside the test: a row a kernel forgets to write (or a dropped row
    multiplied by its zero weight) turns into NaN and fails the comparison with the reference."""
    with poisoned_memory():
        yield
