"""Parallel degrees and the one DeviceMesh every process group comes from.

``ParallelDims`` validates the degrees once and builds one 5-D mesh with named dims in the order
("dp", "cfg", "ring", "ulysses", "tp"). The last dims vary fastest, so tp and ulysses groups land on
consecutive ranks (NVLink neighbours) and the ring, whose P2P traffic tolerates slower links, strides
across them. Every group (ulysses, ring, the flattened sequence-parallel group ring x ulysses, ...) is
a view of that mesh; no module keeps process groups of its own.

Sequence-parallel (SP) rank order is ``sp_rank = ring_rank * ulysses + ulysses_rank`` (row-major over
("ring", "ulysses")), which is the rank order of the flattened "sp" mesh dim.

Every degree check lives here (the world size, the heads Ulysses splits, what tensor parallelism cuts) and raises
``LayoutError``; k5.parallel.plan chooses the degrees and applies the techniques.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp", "cfg", "ring", "ulysses", "tp")
# Flattened views of the same mesh, built once with it:
# sp: the sequence-parallel ranks; replica: the ranks holding one model replica (same dp and cfg);
# item: the ranks working on one item (same dp: both CFG halves).
FLAT_DIMS = {"sp": ("ring", "ulysses"), "replica": ("ring", "ulysses", "tp"), "item": ("cfg", "ring", "ulysses", "tp")}


class LayoutError(ValueError):
    """Degrees that cannot run. The message names what is wrong and what would fit; ``degrees`` holds the degrees
    asked for (by name, as in MESH_DIMS), ``choices`` the flag sets that would fit (possibly none)."""

    def __init__(self, message: str, degrees: dict[str, int] | None = None, choices=()):
        super().__init__(message)
        self.degrees = dict(degrees or {})
        self.choices = list(choices)


def _divisor_pairs(n: int) -> list[tuple[int, int]]:
    """(ulysses, ring) pairs with ulysses * ring == n, largest ulysses first."""
    return [(u, n // u) for u in range(n, 0, -1) if n % u == 0]


def _flag_list(degrees: dict[str, int]) -> str:
    """CLI flags: always ulysses and ring, then the other degrees above 1."""
    order = ("ulysses", "ring", "tp", "cfg", "dp")
    shown = [(name, degrees.get(name, 1)) for name in order if name in ("ulysses", "ring") or degrees.get(name, 1) > 1]
    return " ".join(f"--{name}-degree {d}" for name, d in shown)


@dataclass
class ParallelDims:
    dp: int = 1
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    tp: int = 1
    mesh: DeviceMesh | None = field(default=None, init=False, repr=False, compare=False)
    _flat: dict | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in MESH_DIMS:
            d = getattr(self, name)
            if not isinstance(d, int) or d < 1:
                raise LayoutError(f"--{name}-degree must be a positive integer, got {d!r}")
        if self.cfg > 2:
            raise LayoutError(f"--cfg-degree {self.cfg}: classifier-free guidance has 2 branches; use 1 or 2",
                              self.degrees)

    @property
    def degrees(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_DIMS}

    @property
    def world_size(self) -> int:
        n = 1
        for d in self.degrees.values():
            n *= d
        return n

    @property
    def sp_size(self) -> int:
        return self.ring * self.ulysses

    def validate(self, world_size: int) -> None:
        """Raise one LayoutError if the degrees do not multiply to ``world_size``."""
        if self.world_size == world_size:
            return
        product = " * ".join(f"{name} {d}" for name, d in self.degrees.items())
        # Suggest keeping dp/cfg/tp as given when they still fit, and splitting the rest over ulysses x ring.
        others = self.dp * self.cfg * self.tp
        suggestions = []
        if world_size % others == 0:
            for u, r in _divisor_pairs(world_size // others):
                suggestions.append(_flag_list({**self.degrees, "ulysses": u, "ring": r}))
        else:
            suggestions = [_flag_list({"ulysses": u, "ring": r}) for u, r in _divisor_pairs(world_size)]
        raise LayoutError(
            f"parallel degrees multiply to {self.world_size} ({product}) but the world size is {world_size}; "
            f"valid choices include: " + "; ".join(suggestions),
            self.degrees, suggestions,
        )

    def check_heads(self, num_heads: int) -> None:
        """Ulysses splits heads: raise if ``num_heads``, the heads one tp rank holds (the model's heads / tp),
        does not divide by the ulysses degree."""
        if num_heads % self.ulysses == 0:
            return
        fits = [f"--ulysses-degree {u} --ring-degree {r}" for u, r in _divisor_pairs(self.sp_size) if num_heads % u == 0]
        held = (f"with --tp-degree {self.tp} each rank holds {num_heads} of the {num_heads * self.tp} heads, and "
                if self.tp > 1 else "")
        raise LayoutError(
            f"{held}{num_heads} heads do not divide by ulysses degree {self.ulysses}; "
            f"use {' or '.join(fits)} (ulysses x ring = {self.sp_size})",
            self.degrees, fits,
        )

    def check_model(self, num_heads: int, ff_dim: int) -> None:
        """Raise if the model cannot run on these degrees: tp must cut its heads and FFN width into equal parts, and
        the heads each tp rank holds must divide by the ulysses degree."""
        check_tp_degree(num_heads, ff_dim, self.tp)
        self.check_heads(num_heads // self.tp)

    # ---- the mesh -------------------------------------------------------------------------------------

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Build the one DeviceMesh ("dp", "cfg", "ring", "ulysses", "tp") over the default process group."""
        if not dist.is_initialized():
            raise RuntimeError("build_mesh needs torch.distributed initialized (torchrun / init_process_group)")
        self.validate(dist.get_world_size())
        shape = tuple(self.degrees.values())
        self.mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        self._flat = {name: self.mesh[dims]._flatten(name) for name, dims in FLAT_DIMS.items()}
        return self.mesh

    def _need_mesh(self) -> DeviceMesh:
        if self.mesh is None:
            raise RuntimeError("ParallelDims.build_mesh(device_type) must be called before asking for groups")
        return self.mesh

    def group(self, dim: str) -> dist.ProcessGroup:
        """Process group along one mesh dim ("dp", "cfg", "ring", "ulysses", "tp") or a flattened one (FLAT_DIMS)."""
        mesh = self._need_mesh()
        return self._flat[dim].get_group() if dim in FLAT_DIMS else mesh.get_group(dim)

    def rank(self, dim: str) -> int:
        """This process's coordinate along ``dim`` (its rank within ``group(dim)``)."""
        mesh = self._need_mesh()
        return self._flat[dim].get_local_rank() if dim in FLAT_DIMS else mesh.get_local_rank(dim)

    @property
    def ulysses_group(self) -> dist.ProcessGroup:
        return self.group("ulysses")

    @property
    def ring_group(self) -> dist.ProcessGroup:
        return self.group("ring")

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.group("sp")

    @property
    def ulysses_rank(self) -> int:
        return self.rank("ulysses")

    @property
    def ring_rank(self) -> int:
        return self.rank("ring")

    @property
    def sp_rank(self) -> int:
        return self.rank("sp")


def check_tp_degree(num_heads: int, ff_dim: int, tp: int) -> None:
    """Raise if ``tp`` does not divide the heads and the FFN width (the two things TP cuts into equal parts)."""
    if isinstance(tp, int) and tp >= 1 and num_heads % tp == 0 and ff_dim % tp == 0:
        return
    fits = [d for d in range(1, num_heads + 1) if num_heads % d == 0 and ff_dim % d == 0]
    raise LayoutError(
        f"--tp-degree {tp} does not divide the model's {num_heads} heads and ff_dim {ff_dim}; "
        f"use --tp-degree {' or '.join(map(str, fits))}",
        {"tp": tp}, [f"--tp-degree {d}" for d in fits],
    )
