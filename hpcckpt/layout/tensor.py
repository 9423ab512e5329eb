"""A tensor's identity: name, global shape and safetensors dtype."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..dtypes import itemsize


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What every stage needs to know of a tensor, whatever holds it.

    A strategy's ``TensorSpec`` adds how it is split (``spec.info`` gives this record);
    a safetensors header's ``TensorEntry`` adds where its bytes are in one file.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize
