"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def poison_uninitialized_memory():
    """With deterministic algorithms on, torch fills every torch.empty with NaN: a row a kernel
    forgets to write (or a dropped row multiplied by its zero weight) then turns into NaN and
    fails the comparison with the reference."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before)
