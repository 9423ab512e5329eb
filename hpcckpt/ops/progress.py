"""A progress bar on rank 0 for long work (tqdm; silent when stderr is not a terminal)."""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self._bar = None
        if enabled and total > (256 << 20) and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                             unit_divisor=1024, leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
