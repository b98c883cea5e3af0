"""Memory: what a run used, measured per phase (the estimate made before loading is parallel/memory.py's).

Measurement. torch's CUDA peak counters are process-wide, so one tracker (``PEAKS``) owns them: every phase starts
by folding the previous peak into the run's maximum and resetting the counters, and ends by recording its own peak
and which components were resident. The run's peak (allocated and reserved) is the maximum over phases, and the
decode's own peak sits beside it. On the CPU only the process's peak RSS is known.
"""

from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass, field

import torch

GiB = 2**30
OFFLOAD_MODES = ("none", "text", "model")  # where the weights wait while unused (engine/pipelines/video.py)


# ---- measured ------------------------------------------------------------------------------------------------


@dataclass
class PhasePeak:
    name: str
    allocated: int
    reserved: int
    resident: list[str]


@dataclass
class RunPeaks:
    """Peak device memory over the whole run and per phase (see the module docstring)."""

    allocated: int = 0
    reserved: int = 0
    phases: list[PhasePeak] = field(default_factory=list)
    resident: object = None  # () -> list[str]: the components on the device now (set by the pipeline)

    def _fold(self, device) -> None:
        self.allocated = max(self.allocated, torch.cuda.max_memory_allocated(device))
        self.reserved = max(self.reserved, torch.cuda.max_memory_reserved(device))

    @contextlib.contextmanager
    def phase(self, name: str, device):
        device = torch.device(device)
        if device.type != "cuda":
            yield None
            return
        self._fold(device)
        torch.cuda.reset_peak_memory_stats(device)
        record = PhasePeak(name, 0, 0, [])
        try:
            yield record
        finally:
            record.allocated = torch.cuda.max_memory_allocated(device)
            record.reserved = torch.cuda.max_memory_reserved(device)
            record.resident = list(self.resident()) if self.resident else []
            self._fold(device)
            self.phases.append(record)

    def report(self, device) -> dict:
        """The run's peaks in GiB: allocated and reserved over every phase, the phase that held the peak and what
        was resident then, and the VAE decode's own peak."""
        device = torch.device(device)
        if device.type != "cuda":
            return {"device": str(device), "peak_rss_gib": round(rss_peak_bytes() / GiB, 3)}
        self._fold(device)
        top = max(self.phases, key=lambda p: p.allocated, default=None)
        decode = [p.allocated for p in self.phases if p.name == "decode"]
        return {
            "device": str(device),
            "peak_allocated_gib": round(self.allocated / GiB, 3),
            "peak_reserved_gib": round(self.reserved / GiB, 3),
            "peak_phase": top.name if top else None,
            "resident_at_peak": top.resident if top else [],
            "decode_peak_allocated_gib": round(max(decode) / GiB, 3) if decode else None,
        }


PEAKS = RunPeaks()  # the process's CUDA peak counters are global, so is their one reader


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def format_peaks(report: dict) -> str:
    if "peak_rss_gib" in report:
        return f"peak memory {report['peak_rss_gib']:.2f} GiB RSS"
    line = (f"peak memory {report['peak_allocated_gib']:.2f} GiB allocated / {report['peak_reserved_gib']:.2f} GiB "
            f"reserved on {report['device']}")
    if report["peak_phase"]:
        line += f" (during {report['peak_phase']}, resident: {', '.join(report['resident_at_peak']) or 'nothing'})"
    if report["decode_peak_allocated_gib"] is not None:
        line += f", VAE decode peak {report['decode_peak_allocated_gib']:.2f} GiB"
    return line
