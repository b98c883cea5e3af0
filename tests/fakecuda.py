"""Fake CUDA: k5's CUDA path run on a CPU-only torch, with tensors that have shapes, dtypes and devices but no data.

torch's FakeTensorMode computes every op's output metadata without computing anything, and it does so for CUDA
tensors on a build without CUDA. Real shapes cost nothing (a 19B-parameter DiT is a few MB of Python objects), so the
DiT, the sampler, the parallel layouts (one rank of an 8-rank job on torch's fake process group) and the decode run
at the sizes a GPU job runs, in seconds. What this proves and what it cannot: README, "What the fake-CUDA checks
prove".

The shim (``FakeCuda``): a few CPU-build entry points raise "PyTorch is not linked with support for cuda devices"
before they reach the fake mode, because their Python bindings take a CUDA device guard: ``Tensor.__getitem__`` /
``__setitem__``, ``copy_``, ``to``, ``cuda``, ``contiguous``, ``__invert__``, ``new_tensor``, ``tolist``,
``nonzero``, ``int(t)``, ``float(t)`` (``SHIMMED``); ``torch.tensor(data, device="cuda")`` fails the same way under
inference_mode. For fake tensors they go to their aten ops instead, which the fake mode handles. They are patched on
the Tensor class for the duration, not routed by a TorchFunctionMode: torch's own fake kernels (flex attention's)
and dynamo's fake propagation of a traced graph call them with function modes off. ``torch.Generator("cuda")``
becomes a CPU generator, ``torch.cuda`` reports ``world`` devices of the chosen capability, ``torch.compile``
compiles with a backend that keeps every graph (``FakeCuda.graphs``) and runs it eagerly on the fake tensors
(inductor's CUDA code generation needs a CUDA build; what it would be asked is checked from the graphs:
``flex_tile_problems``).

The watch (``Watch``, a TorchDispatchMode above the fake mode) records, with the k5 line that caused it:
- device-to-host syncs: ``item()``, ``bool(t)``, ``tolist()``... (``_local_scalar_dense`` of a CUDA tensor), copies
  from CUDA to the host, ops whose output size depends on the data (``nonzero``, boolean indexing...);
- host-to-device copies: ``.to(device)`` / ``.cuda()`` / ``torch.tensor(data, device=...)`` of host memory, which
  on a GPU is a copy from pageable memory that synchronises the stream;
- every collective and the devices of its tensors.
Events carry the sampler step they happened in (``Watch.sampling``), so a check can tell the steady-state step loop
from once-per-item work. A read of a value that does not exist under fake tensors raises (DataDependentOutputException
from the fake mode) unless the test gave a stand-in for its site (``Watch.answers``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parents[1]
_K5_DIRS = tuple(str(ROOT / d) + "/" for d in ("engine", "kernels", "parallel", "launch"))
_NOT_LINKED = "not linked with support for cuda devices"

# ---- where an event comes from ----------------------------------------------------------------------------------


def k5_site(depth: int = 2) -> tuple[str, int]:
    """("engine/sampling/sampler.py:sample", line) of the innermost k5 frame on the stack; ("", 0) when k5 is not on it."""
    frame = sys._getframe(depth)
    while frame is not None and not frame.f_code.co_filename.startswith(_K5_DIRS):
        frame = frame.f_back
    if frame is None:
        return "", 0
    rel = Path(frame.f_code.co_filename).relative_to(ROOT)
    return f"{rel}:{frame.f_code.co_name}", frame.f_lineno


# ---- the shim: CUDA entry points a CPU build refuses -------------------------------------------------------------


def _expand_index(x: torch.Tensor, index) -> list:
    index = list(index) if isinstance(index, tuple) else [index]
    used = sum(i.dim() if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1
               for i in index if i is not None and i is not Ellipsis)
    out = []
    for i in index:
        out += [slice(None)] * (x.dim() - used) if i is Ellipsis else [i]
    return out


def _view_and_indices(x: torch.Tensor, index):
    """Basic indexing (ints, slices, None) as aten views; tensor indices returned for aten.index at their dims."""
    dim, advanced = 0, []
    for i in _expand_index(x, index):
        if i is None:
            x = aten.unsqueeze(x, dim)
            advanced.append(None)
            dim += 1
        elif isinstance(i, (int, torch.SymInt)) and not isinstance(i, bool):
            x = aten.select.int(x, dim, i)
        elif isinstance(i, slice):
            x = aten.slice.Tensor(x, dim, 0 if i.start is None else i.start,
                                  sys.maxsize if i.stop is None else i.stop, 1 if i.step is None else i.step)
            advanced.append(None)
            dim += 1
        elif isinstance(i, torch.Tensor):
            if i.dtype == torch.bool:  # covers i.dim() dims; aten.index takes the mask whole
                advanced += [i] + [Ellipsis] * (i.dim() - 1)
                dim += i.dim()
            else:
                advanced.append(i)
                dim += 1
        else:
            raise TypeError(f"fake CUDA indexing does not handle the index {i!r}")
    indices = [a for a in advanced if a is not Ellipsis]
    while indices and indices[-1] is None:
        indices.pop()
    return x, indices


def _getitem(x, index):
    view, indices = _view_and_indices(x, index)
    return aten.index.Tensor(view, indices) if indices else view


def _setitem(x, index, value):
    view, indices = _view_and_indices(x, index)
    if indices:
        if not isinstance(value, torch.Tensor):
            value = torch.full((), value, dtype=x.dtype, device=x.device)
        aten.index_put_(view, indices, value)
    elif isinstance(value, torch.Tensor):
        aten.copy_(view, value)
    else:
        aten.fill_.Scalar(view, value)


def _cuda_index(device) -> torch.device:
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if device.index is None else device


def _to(x, device, dtype, non_blocking):
    if device is not None and device.type == "cuda":
        device = _cuda_index(device)
    if (device is None or device == x.device) and (dtype is None or dtype == x.dtype):
        return x
    return aten._to_copy(x, dtype=dtype or x.dtype, device=device or x.device, non_blocking=non_blocking)


def _shim(name, original):
    """``original`` (a Tensor method) for real tensors; its aten route for fake ones."""

    def route(self, *args, **kwargs):
        if name == "__getitem__":
            return _getitem(self, *args)
        if name == "__setitem__":
            return _setitem(self, *args)
        if name == "copy_":
            return aten.copy_.default(self, args[0], kwargs.get("non_blocking", args[1] if len(args) > 1 else False))
        if name == "to":
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
            return _to(self, device, dtype, non_blocking)
        if name == "cuda":
            device = args[0] if args else kwargs.get("device")
            return _to(self, _cuda_index("cuda" if device is None else device), None,
                       kwargs.get("non_blocking", False))
        if name == "new_tensor":
            return _to(torch.tensor(args[0]), self.device, kwargs.get("dtype") or self.dtype, False)
        if name in ("__int__", "__index__", "__float__"):
            return (float if name == "__float__" else int)(aten.item.default(self))
        if name == "tolist":  # a copy to the host, then reads (which have no data here)
            host = _to(self, torch.device("cpu"), None, False)
            return [aten._local_scalar_dense.default(host.reshape(-1)[i]) for i in range(host.numel())]
        return getattr(aten, {"__invert__": "bitwise_not"}.get(name, name))(self, *args, **kwargs)

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        fake = isinstance(self, FakeTensor) or (name == "copy_" and args and isinstance(args[0], FakeTensor))
        return route(self, *args, **kwargs) if fake else original(self, *args, **kwargs)

    return method


def _factory(original):
    """torch.tensor / torch.as_tensor with a CUDA device: host data made on the host, then copied (what they do on a
    GPU). Under inference_mode torch makes the CUDA tensor below the fake mode, which a CPU build cannot."""

    @functools.wraps(original)
    def factory(data, *args, dtype=None, device=None, **kwargs):
        if device is None or torch.device(device).type != "cuda":
            return original(data, *args, dtype=dtype, device=device, **kwargs)
        if isinstance(data, torch.Tensor):
            return _to(data, torch.device(device), dtype, False)
        return _to(original(data, *args, dtype=dtype, **kwargs), torch.device(device), None, False)

    return factory


def _generator_factory(original):
    class Generator:  # torch.Generator("cuda") needs the CUDA library: a CPU one draws the same fake numbers
        def __new__(cls, device="cpu"):
            return original("cpu")

    return Generator


# Tensor methods whose CPU-build bindings take a CUDA device guard (found by calling each on a fake CUDA tensor).
SHIMMED = ("__getitem__", "__setitem__", "copy_", "to", "cuda", "new_tensor", "tolist", "contiguous", "__invert__",
           "nonzero", "__int__", "__index__", "__float__")


# ---- the watch ---------------------------------------------------------------------------------------------------

H2D, D2H, HOST_READ, COLLECTIVE = "host-to-device copy", "device-to-host sync", "host read", "collective"
SYNC = "device synchronize"  # torch.cuda.synchronize()


@dataclass
class Event:
    kind: str
    op: str
    site: str
    line: int
    step: int | None  # the sampler step in progress (0-based), None outside a sampling loop
    devices: tuple = ()

    def __str__(self) -> str:
        where = f"step {self.step}" if self.step is not None else "outside the step loop"
        return f"{self.kind} {self.op} at {self.site}:{self.line} ({where}, devices {list(map(str, self.devices))})"


def _tensors(args) -> list[torch.Tensor]:
    return [a for a in tree_leaves(args) if isinstance(a, torch.Tensor)]


# Ops that return a tensor's value to Python (item(), bool(t), int(t)...): what answers can stand in for.
_READS = (aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default)


def _data_dependent(func) -> bool:
    return torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags


class Watch(TorchDispatchMode):
    """Records syncs, copies and collectives (see the module docstring) while it is active."""

    supports_higher_order_operators = True  # flex_attention passes through, to the fake mode below

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Off while dynamo traces (it compiles nothing under a user dispatch mode), on while compiled graphs run.
        return True

    def __init__(self):
        super().__init__()
        self.events: list[Event] = []
        self.step: int | None = None
        self.steps: int | None = None  # the loop's length when known: after its last step the loop is over
        self.answers: dict[str, object] = {}  # site or file -> the value a read there gets under fake tensors

    @contextlib.contextmanager
    def sampling(self, steps: int | None = None):
        """Events inside carry the step number; ``step_done`` (the sampler's on_step) advances it."""
        self.step, self.steps = 0, steps
        try:
            yield self.step_done
        finally:
            self.step = None

    def step_done(self, i: int) -> None:
        self.step = None if self.steps is not None and i + 1 >= self.steps else i + 1

    def loop_started(self, steps: int) -> None:
        """For a loop inside a pipeline call: the first DiT forward marks step 0 (``step_done`` the next ones)."""
        if self.step is None and self.steps is None:
            self.step, self.steps = 0, steps

    def record(self, kind, func, args, depth=3) -> Event:
        site, line = k5_site(depth)
        event = Event(kind, str(func), site, line, self.step, tuple(t.device for t in _tensors(args)))
        self.events.append(event)
        return event

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        tensors = _tensors((args, kwargs))
        on_cuda = any(t.is_cuda for t in tensors)
        if func.namespace in ("c10d", "_c10d_functional"):
            self.record(COLLECTIVE, func, (args, kwargs))
        elif func is aten._to_copy.default:
            target = kwargs.get("device") or args[0].device
            if args[0].device.type == "cpu" and target.type == "cuda":
                self.record(H2D, func, args)
            elif args[0].is_cuda and target.type == "cpu":
                self.record(D2H, func, args)
        elif func in (aten.copy_.default, aten.copy.default):
            dst, src = args[0], args[1]
            if dst.is_cuda and src.device.type == "cpu":
                self.record(H2D, func, args)
            elif dst.device.type == "cpu" and src.is_cuda:
                self.record(D2H, func, args)
        elif func in _READS:
            event = self.record(D2H if on_cuda else HOST_READ, func, args)
            for key in (event.site, event.site.split(":")[0]):  # "file:function", or the whole file
                if key in self.answers:
                    answer = self.answers[key]
                    return answer.pop(0) if isinstance(answer, list) else answer  # a list: one value per read
        elif on_cuda and _data_dependent(func):
            self.record(D2H, func, args)
        return func(*args, **kwargs)

    # -- queries --

    def of(self, kind: str, loop_only: bool = False, steady: bool = False) -> list[Event]:
        """k5's events of ``kind`` (an event with no k5 frame on the stack is the test's own); ``loop_only``: inside
        a sampling loop; ``steady``: in a step after the first."""
        return [e for e in self.events if e.kind == kind and e.site and (not loop_only or e.step is not None)
                and (not steady or (e.step or 0) >= 1)]

    def sites(self, kind: str, **which) -> Counter:
        return Counter(e.site for e in self.of(kind, **which))


# ---- the context ---------------------------------------------------------------------------------------------------


def _k5_modules():
    return [m for name, m in list(sys.modules.items()) if name == "k5" or name.startswith("k5.")]


def clear_k5_caches() -> None:
    """Module-level lru caches of k5 (device tensors built once per shape) must not carry fake tensors across modes."""
    for module in _k5_modules():
        for value in list(vars(module).values()):
            if isinstance(value, functools._lru_cache_wrapper):
                value.cache_clear()


class FakeCuda:
    """``with FakeCuda(rank, world) as fc:`` runs the body as rank ``rank`` of a ``world``-GPU node on fake CUDA.

    The process starts as a real one does: current device 0, then generate.py's device rule
    (``k5.launch.env.resolve_device("cuda", LOCAL_RANK)``) and ``torch.cuda.set_device``: ``fc.device`` is what
    that gives, the device the body builds on; ``fc.gpu`` is the GPU this rank owns (cuda:<local rank>, one node),
    where every output and collective must be. A tensor made on another GPU fails with the fake mode's
    device-mismatch error at its first op. With ``world`` > 1 the default process group is torch's fake one
    (collectives return at once and move nothing). ``capability``: what torch.cuda reports (9.0: H100).
    """

    def __init__(self, rank: int = 0, world: int = 1, capability: tuple[int, int] = (9, 0)):
        self.rank, self.world, self.capability = rank, world, capability
        self.gpu = torch.device("cuda", rank)
        self.current = 0  # torch.cuda.current_device() of a fresh process
        self.device: torch.device | None = None
        self.watch = Watch()
        self.graphs: list[torch.fx.GraphModule] = []
        self._stack = contextlib.ExitStack()
        self._compiled: list = []

    # -- what the body uses --

    def module(self, module: nn.Module, dtype: torch.dtype, fp32=lambda name: False) -> nn.Module:
        """``module`` (built on meta) with every parameter a fake tensor of this rank's device, in ``dtype`` except
        where ``fp32(name)`` (the DiT's fp32 modulation: k5.engine.checkpoints.dit.keeps_fp32); buffers keep their dtype."""
        for mname, m in module.named_modules():
            for pname, p in list(m._parameters.items()):
                if p is not None:
                    name = f"{mname}.{pname}" if mname else pname
                    t = torch.empty(p.shape, dtype=torch.float32 if fp32(name) else dtype, device=self.device)
                    m._parameters[pname] = nn.Parameter(t, requires_grad=False)
            for bname, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[bname] = torch.empty(b.shape, dtype=b.dtype, device=self.device)
        return module.eval()

    def build_mesh(self, dims):
        """``dims.build_mesh("cuda")`` on the fake process group. DeviceMesh keeps its rank layout in a host tensor
        it reads back, which has no data under fake tensors: it is built with the fake mode off."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            dims.build_mesh("cuda")
        return dims

    def _backend(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def _compile(self, original):
        def compile(model=None, **kwargs):
            kwargs.pop("mode", None)
            kwargs.pop("options", None)
            kwargs["backend"] = self._backend
            if model is None:
                return lambda m: compile(m, **kwargs)
            out = original(model, **kwargs)
            self._compiled.append(out)
            return out

        return compile

    def _synchronize(self, device=None):
        site, line = k5_site()
        self.watch.events.append(Event(SYNC, "torch.cuda.synchronize", site, line, self.watch.step))

    # -- entering and leaving --

    def __enter__(self) -> "FakeCuda":
        stack = self._stack
        try:
            def patch(obj, name, value):
                stack.enter_context(_patched(obj, name, value))

            # torch.device(...) as a context caches its set of factory functions on first use: one made in here
            # would hold the torch.tensor shim below, and later real runs under ``with torch.device("meta")`` (how
            # transformers builds a model) would make torch.tensor's tensors on the CPU. Cleared on both sides.
            from torch.utils._device import _device_constructors

            _device_constructors.cache_clear()
            stack.callback(_device_constructors.cache_clear)  # runs last: after every patch below is undone
            cuda = torch.cuda
            patch(cuda, "is_available", lambda: True)
            patch(cuda, "device_count", lambda: self.world)
            patch(cuda, "current_device", lambda: self.current)
            patch(cuda, "set_device", self._set_device)
            patch(cuda, "get_device_capability", lambda device=None: self.capability)
            patch(cuda, "synchronize", self._synchronize)
            for name in ("max_memory_allocated", "max_memory_reserved", "memory_allocated", "memory_reserved"):
                patch(cuda, name, lambda device=None: 0)
            patch(cuda, "reset_peak_memory_stats", lambda device=None: None)
            patch(cuda, "empty_cache", lambda: None)
            patch(cuda, "get_rng_state", lambda device="cuda": None)  # dynamo saves and restores it around a trace
            patch(cuda, "set_rng_state", lambda state, device="cuda": None)
            patch(cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
            patch(torch, "Generator", _generator_factory(torch.Generator))
            patch(torch, "tensor", _factory(torch.tensor))
            patch(torch, "as_tensor", _factory(torch.as_tensor))
            patch(torch, "compile", self._compile(torch.compile))
            stack.enter_context(_sequence_slots_kept(torch.Tensor))  # undone after the shims below
            for name in SHIMMED:
                patch(torch.Tensor, name, _shim(name, getattr(torch.Tensor, name)))
            self._set_aside_compiled()
            stack.callback(self._restore_globals)
            clear_k5_caches()
            stack.callback(clear_k5_caches)
            stack.callback(torch._dynamo.reset)
            torch._dynamo.reset()
            if self.world > 1:
                from torch.testing._internal.distributed.fake_pg import FakeStore

                dist.init_process_group("fake", store=FakeStore(), rank=self.rank, world_size=self.world)
                stack.callback(dist.destroy_process_group)
            # Host data made outside the mode (an image file's pixels, a CPU generator's draws) becomes fake on use.
            # The fake mode runs ops on constant host data for real unless the target device is missing, which it
            # learns from torch.cuda.is_available(), patched to True above: it must be told CUDA is not there. (On the
            # class: torch's higher-order ops find their fake rules by the mode's exact type.)
            patch(FakeTensorMode, "avoid_device_init", property(lambda mode: True))
            self.mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            stack.enter_context(self.watch)
            self.device = self._start_rank()
        except BaseException:
            stack.close()
            raise
        return self

    def _start_rank(self) -> torch.device:
        """What launch/generate.py does with --device cuda on this rank before anything else."""
        from k5.launch import env as launch_env

        device = launch_env.resolve_device("cuda", self.rank, ranks_here=self.world)
        torch.cuda.set_device(device)
        return device

    def _set_device(self, device) -> None:
        index = device if isinstance(device, int) else torch.device(device).index
        if index is not None:  # torch.cuda.set_device("cuda") keeps the current device, as torch does
            self.current = index

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def _set_aside_compiled(self):
        """Compiled callables kept in k5 module globals (kernels.flex's compiled flex_attention) are compiled again
        in here, with the recording backend: one compiled for real before would send fake CUDA tensors to inductor."""
        self._globals = {m: dict(vars(m)) for m in _k5_modules()}
        for module, names in self._globals.items():
            for name, value in names.items():
                if _compiled_callable(value):
                    setattr(module, name, None)

    def _restore_globals(self):
        """Module globals go back to what they were before, where in here they were set aside or set to something
        compiled with the recording backend (which would run eagerly in later real runs)."""
        compiled = {id(c) for c in self._compiled}
        for module, before in self._globals.items():
            for name, value in list(vars(module).items()):
                if id(value) in compiled or (value is None and _compiled_callable(before.get(name))):
                    setattr(module, name, before.get(name))


def _compiled_callable(value) -> bool:
    """A torch.compile'd function, not a torch.compiler.disable'd one (both carry _torchdynamo_orig_callable; a
    disabled function such as parallel/ring.py's _ring_loop is plain eager code and stays)."""
    return hasattr(value, "_torchdynamo_orig_callable") and not getattr(value, "_torchdynamo_disable", False)


@contextlib.contextmanager
def _sequence_slots_kept(cls: type):
    """Puts back ``cls``'s C sequence slots as they were. Setting ``__getitem__``/``__setitem__`` on a class fills
    both the mapping and the sequence slot (CPython's update_slot), and setting the original back, or deleting it,
    leaves the sequence slot filled: every tensor would then pass PySequence_Check for the rest of the process, and
    ``torch.tensor([t0, t1])`` of 0-d tensors fails with "len() of a 0-d tensor" (what transformers' Qwen2.5-VL
    rope index does). The slots are restored by value: tp_as_sequence is the 14th pointer of PyTypeObject and
    PySequenceMethods holds 10 pointers (CPython 3.8 to 3.13)."""
    if sys.implementation.name != "cpython":
        raise RuntimeError("the fake-CUDA harness restores CPython type slots")
    table = ctypes.c_void_p.from_address(id(cls) + 13 * ctypes.sizeof(ctypes.c_void_p)).value
    slots = (ctypes.c_void_p * 10).from_address(table)
    before = list(slots)
    try:
        yield
    finally:
        slots[:] = before


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ---- what inductor would be asked: flex attention tiles -----------------------------------------------------------


@dataclass(frozen=True)
class FlexCall:
    head_dim: int
    dtype: torch.dtype
    q_block: int  # the BlockMask's block sizes (tokens)
    kv_block: int
    kernel_options: dict = field(hash=False)


def flex_calls(graphs) -> list[FlexCall]:
    """Every flex_attention call in the compiled graphs, with what its lowering receives."""
    calls = []
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.target is not torch.ops.higher_order.flex_attention:
                continue
            q = node.args[0].meta.get("example_value", node.args[0].meta.get("val"))
            block_mask = node.args[4]
            calls.append(FlexCall(int(q.shape[-1]), q.dtype, int(block_mask[-3]), int(block_mask[-2]),
                                  dict(node.args[6])))
    return calls


def flex_tile_problems(call: FlexCall, capability: tuple[int, int]) -> list[str]:
    """Why inductor's flex lowering would refuse ``call`` on a GPU of ``capability`` (empty: it would not).

    The rule of torch/_inductor/kernel/flex/flex_attention.py (lowering of the flex HOP): for each config inductor
    offers for (head_dim, dtype) on this GPU, the user's kernel options win (``fwd_`` prefixed ones too) and the
    config fills the rest; BLOCK_M must divide the BlockMask's query block and BLOCK_N its key block. A config that
    does not is skipped, or raises "Q and KV block size must be divisible by BLOCK_M and BLOCK_N" when it is the only
    one (no max-autotune).
    """
    from torch._inductor.choices import InductorChoices

    options = {k: v for k, v in call.kernel_options.items() if k != "BACKEND"}
    for k in list(options):
        if k.startswith("fwd_"):
            options[k[4:]] = options.pop(k)
    with _patched(torch.cuda, "get_device_capability", lambda device=None: capability):
        configs = InductorChoices().get_flex_attention_fwd_configs(call.head_dim, call.dtype, "cuda")
    bad = []
    for conf in configs:
        m, n = options.get("BLOCK_M", conf.block_m), options.get("BLOCK_N", conf.block_n)
        if call.q_block % m or call.kv_block % n:
            bad.append(f"BLOCK_M {m} x BLOCK_N {n} does not divide the {call.q_block}x{call.kv_block} mask blocks "
                       f"(head dim {call.head_dim}, {call.dtype}, sm{capability[0]}{capability[1]})")
    return bad if len(bad) == len(configs) else []


def _skip_dynamo_frames() -> None:
    """Dynamo never compiles a frame of this harness (the shims, the factories, the watch): eager code that a
    ``torch.compiler.disable(recursive=False)`` function runs (parallel/ring.py's _ring_loop) hands every frame it
    calls to dynamo, and a shim traced by dynamo would take its non-fake branch (dynamo does not see a FakeTensor in
    ``isinstance``) into the CPU build's CUDA check. Their callees are still traced as before."""
    from torch._dynamo.eval_frame import skip_code

    def codes(code):
        yield code
        for const in code.co_consts:
            if isinstance(const, type(code)):
                yield from codes(const)

    for value in list(globals().values()):
        functions = [value] if callable(value) and hasattr(value, "__code__") else (
            [v for v in vars(value).values() if hasattr(v, "__code__")] if isinstance(value, type) else [])
        for fn in functions:
            if getattr(fn, "__module__", None) == __name__:
                for code in codes(fn.__code__):
                    skip_code(code)


_skip_dynamo_frames()
