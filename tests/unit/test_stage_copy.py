"""The async save manager's staging copy: hpcckpt._ntcopy (non-temporal stores, built from
hpcckpt/_ntcopy.c at install) and stage_copy, which falls back to numpy without it."""
from __future__ import annotations

import numpy as np
import pytest

from hpcckpt.ops import save as ops_save

PAGE = 4096
SIZES = [0, 1, 63, 4 * PAGE - 1, 4 * PAGE, 5 * PAGE + 17, 3 << 20, (8 << 20) - 5]


def test_the_extension_is_built():
    # `make venv` compiles it (the README asks for a C compiler); a silent fallback to
    # numpy would cost the async save a third of its staging speed
    from hpcckpt import _ntcopy
    assert _ntcopy.KERNEL in ("avx512f", "avx2", "sse2", "memcpy")


@pytest.mark.parametrize("use_extension", [True, False])
def test_every_size_and_alignment_copies_exactly(monkeypatch, use_extension):
    if not use_extension:
        monkeypatch.setattr(ops_save, "_ntcopy", None)
    rng = np.random.default_rng(7)
    big = rng.integers(0, 256, (8 << 20) + 2 * PAGE, dtype=np.uint8)
    for n in SIZES:
        for src_at in (0, 1, 13, PAGE - 1):
            for dst_at in (0, 3, 64, PAGE - 96):
                src = memoryview(big)[src_at:src_at + n]
                dst = np.zeros(n + dst_at + 8, np.uint8)
                ops_save.stage_copy(dst[dst_at:dst_at + n], src)
                assert np.array_equal(dst[dst_at:dst_at + n], big[src_at:src_at + n]), \
                    (n, src_at, dst_at)
                assert not dst[:dst_at].any() and not dst[dst_at + n:].any(), (n, src_at, dst_at)


def test_refusals_word_for_word():
    from hpcckpt import _ntcopy
    with pytest.raises(ValueError) as e:
        _ntcopy.copy(bytearray(8), b"123")
    assert str(e.value) == "copy: the destination holds 8 bytes, the source 3"
    with pytest.raises(TypeError):
        _ntcopy.copy(b"read-only", b"12345678")
