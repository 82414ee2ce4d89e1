"""The one exception hierarchy and the shared failure classification of step5.errors."""
from __future__ import annotations

import pytest

from step5.errors import is_out_of_memory


class _LibraryError(Exception):
    """Stands in for a tree library's own error class."""


class _AllocatorError(RuntimeError):
    """Stands in for torch's OutOfMemoryError, which this torch-free test cannot import."""


@pytest.mark.parametrize(
    ("exc", "oom_types", "expected"),
    [
        (MemoryError(), (), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), (), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: not enough memory"), (), True),
        (RuntimeError("can't allocate memory: you tried to allocate 8 bytes"), (), True),
        (_LibraryError("Out of memory in GPU histogram"), (), True),
        (_AllocatorError("allocation failed"), (_AllocatorError,), True),
        (_AllocatorError("allocation failed"), (), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), (), False),
        (ValueError("learning_rate must be positive"), (), False),
    ],
)
def test_is_out_of_memory(exc, oom_types, expected):
    assert is_out_of_memory(exc, oom_types) is expected
