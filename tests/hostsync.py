"""Count the device-to-host reads a piece of k5 code would make on a GPU, on the CPU.

A device-to-host read makes the host wait for the device: reading a value (``item``, ``tolist``, ``bool(t)``,
``int(t)``, ``float(t)``), copying to host memory (``cpu``, ``numpy``, ``to`` a CPU device), or an op whose output
size depends on the data (``nonzero``). On the CPU these cost nothing, but the same Python calls are what stalls a
GPU's launch queue, so counting the calls counts the syncs. A ``to`` call counts when its k5 line names the CPU
(``.to("cpu")``, ``.to(device="cpu")``). Each call is attributed to the innermost frame of k5's engine/, kernels/ or
parallel/ code that led to it (a torch function that syncs internally is charged to the k5 function that called
it); calls with no such frame (the test's own) are not counted.

What this cannot see: host-to-device copies. ``t.to(device)`` of a tensor built on the host is a copy from pageable
host memory, which synchronises the stream on a GPU just as a read does; on a CPU run the host is the device, and
the copy cannot be told from a no-op. (This counter once treated every ``.to(device)`` as free, so the denoising
loop's 11 copies per CFG step passed as "no host syncs".) They are counted where they are visible: on fake CUDA
(tests/fakecuda.py), where host data keeps the device ``cpu`` and each copy is an ``aten._to_copy`` from cpu to cuda
(``Watch.of(H2D)``); test_fastpath.py runs the denoising loop there too.
"""

from __future__ import annotations

import linecache
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = tuple(str(ROOT / d) + "/" for d in ("engine", "kernels", "parallel"))
_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


def _k5_frame():
    frame = sys._getframe(2)  # 0: here, 1: the wrapper, 2: the caller of the Tensor method
    while frame is not None and not frame.f_code.co_filename.startswith(_PACKAGES):
        frame = frame.f_back
    return frame


class HostSyncs:
    """``with HostSyncs() as syncs: ...`` then ``syncs.sites``: Counter of "file:function" -> calls."""

    def __init__(self):
        self.sites: Counter[str] = Counter()
        self._saved = {}

    def _wrap(self, name, original):
        def counted(t, *args, **kwargs):
            frame = _k5_frame()
            if frame is not None and (name != "to" or _names_cpu(frame)):
                self.sites[f"{Path(frame.f_code.co_filename).relative_to(ROOT)}:{frame.f_code.co_name}"] += 1
            return original(t, *args, **kwargs)

        return counted

    def __enter__(self):
        for name in (*_READS, "to"):
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return False

    def outside(self, allowed: dict[str, str]) -> dict[str, int]:
        """The sites not in ``allowed`` ({site: why it is no sync on a GPU}), with their counts."""
        return {site: n for site, n in self.sites.items() if site not in allowed}


def _names_cpu(frame) -> bool:
    return "cpu" in linecache.getline(frame.f_code.co_filename, frame.f_lineno)
