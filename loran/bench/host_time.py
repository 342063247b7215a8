"""Host time of one adapted layer's training step: how many ops it dispatches, where they come from, what they cost.

    python -m loran.bench.host_time                                   # d=256, r=8, T=16 on the CPU, every arm
    python -m loran.bench.host_time --device cuda --d 4096 --r 64 --tokens 2048 --base nf4   # issue 22's size
    python -m loran.bench.host_time --no-compile --json out.json

Issue 22 (item 2) found a LoRAN layer's step host-bound on an H200 (LoRAN's autocast step: 0.82 ms of kernels inside
4.4 ms wall). This benchmark says where the host time of one forward + backward of ONE adapted d x d layer goes, per
arm (a configuration of the layer) and per path the layer actually took (``choose_path``, recorded as every benchmark
records it: ``cost.record_paths``):

- ops: the aten ops the step dispatches, counted exactly by a TorchDispatchMode (``OpCounter``), grouped by where
  they come from (``GROUPS``): the base layer, the adapter's dropout, PEFT's lora_A / lora_B modules, the glue of
  PEFT's forward and ``LoranVariant`` (casts, sums), the forward and backward of loran.autograd's Functions, the
  backward of built-in ops of each of those (attributed to the module that created the autograd node), and the
  autograd engine's own (AccumulateGrad). Views (no kernel) and casts (``_to_copy``) are counted too; "launching"
  is the ops less views and allocations without a fill (an estimate of kernels launched on a GPU). A torch.compile'd
  call (the library's fused element-wise kernels, ``autograd.KERNELS``, or this benchmark's compiled arms) counts as
  one compiled call: its inside is one generated kernel per fused loop plus the matmuls inductor leaves to BLAS.
- host ms: wall-clock time of one step (median of `repeats`, after `warmup`), nothing attached; on CUDA the time
  until step() returns without synchronising (the CPU's share: launches, Python, PEFT), then wall (synchronised).
  At a small size (d=256, r=8, T=16) compute is small and host time is mostly per-op dispatch and Python; the
  ``dispatch_us`` line gives this CPU's cost of one trivial aten op for scale.
- device ms, kernels (CUDA only): torch.profiler's device events per step (kernels, memcpy, memset) and the sum of
  their durations: if host ms > device ms, the step is host-bound.
- choose_path us: the Python decision itself (layer-level plus, on PEFT's forward, the adapter-level call; the
  compiled arms skip it, a library version of them would not).
- peak MiB (CUDA only): peak memory allocated during one step beyond what existed before it.

Arms (``arm_specs``), all d x d, x requiring its grad as inside a network, B drawn at a trained-like scale:
- peft lora bf16: PEFT's own LoraConfig under bf16 autocast (the QLoRA baseline as PEFT computes it);
- qlora / loran bf16 <policy>: LoranConfig with f = identity (the QLoRA row) and Sinter, bf16 base and input under
  bf16 autocast, the update precision policy "float32" (configs' default) or "autocast": paths lora cast / lora and
  residual;
- loran bf16 <policy> compiled update / compiled layer / compiled update cudagraphs: BENCH ARMS, not the library's
  path. The residual path's whole update c s (x A^T) B^T + s x g(B A)^T as one torch.compile'd function of (x, A, B)
  under activation checkpointing (so backward recomputes Z = B A and autograd keeps x, A, B only, as the library's
  Function does): one compiled call per pass per layer (``compiled_update``). "layer" also takes the base matmul into
  the graph (bf16 base only); "cudagraphs" is mode="reduce-overhead" (CUDA only). Same dtypes as the library's path
  (Z and g(Z) in float32, the products in the policy's dtype); the compiled call runs with autocast off (under an
  enclosing autocast the checkpointed recompute computed g(Z) differently: dL/dA off by 0.3 % on torch 2.13's CPU);
- loran bf16 <policy> one block: the library's residual path with BLOCK_ELEMENTS and COMPILED_CHUNK_ELEMENTS set to
  d x d for the arm (``library_settings``): one row block, one fused element-wise call per pass, where the default
  (2**22 elements) takes 4 blocks at d=4096, each with its own ops and fused call; the transient buffers grow to
  d x d (peak MiB on CUDA says by how much);
- lora fp32, loran fp32 (no dropout: FOLDED), loran fp32 dropout (UNFOLDED, the residual path in float32): the paths
  of an fp32 layer without autocast, as on the CPU pipeline.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from loran.bench import cost

# --- where an op comes from ------------------------------------------------------------------------------------

BASE, DROPOUT, LORA_MODULES, WRAPPER = "base layer", "dropout", "PEFT lora_A/lora_B", "PEFT forward + LoRAN glue"
FN_FORWARD, FN_BACKWARD = "loran.autograd Function forward", "loran.autograd Function backward"
COMPILED, ENGINE, OUTSIDE = "compiled graph", "autograd engine (AccumulateGrad)", "outside the layer"
BACKWARD = " (backward)"  # suffix: backward of built-in ops created in that group's forward
GROUPS = (BASE, DROPOUT, LORA_MODULES, WRAPPER, FN_FORWARD, COMPILED, BASE + BACKWARD, DROPOUT + BACKWARD,
          LORA_MODULES + BACKWARD, WRAPPER + BACKWARD, FN_BACKWARD, COMPILED + BACKWARD, ENGINE, OUTSIDE)
# Ops that launch no kernel beyond views: allocations without a fill.
NO_KERNEL = {"aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default"}
CASTS = {"aten._to_copy.default"}
_AUTOGRAD_FILE = os.path.join("loran", "autograd.py")


@dataclass
class OpCount:
    """Ops of one step: per group, the aten ops, of which views and casts, and compiled calls; `ops`: (group, op) ->
    number, for the detail."""

    ops: Counter = field(default_factory=Counter)
    views: Counter = field(default_factory=Counter)
    casts: Counter = field(default_factory=Counter)
    no_kernel: Counter = field(default_factory=Counter)
    compiled: Counter = field(default_factory=Counter)
    detail: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def launching(self) -> int:
        """Ops that launch a kernel (estimate): all ops less views and allocations without a fill."""
        return self.total - sum(self.views.values()) - sum(self.no_kernel.values())

    def by_group(self) -> dict[str, dict[str, int]]:
        names = [g for g in GROUPS if self.ops[g] or self.compiled[g]]
        names += sorted(g for g in set(self.ops) | set(self.compiled) if g not in GROUPS)
        return {g: {"ops": self.ops[g], "views": self.views[g], "casts": self.casts[g], "compiled": self.compiled[g]}
                for g in names}


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by group (module docstring). Attach to the adapted `layers`
    (``watch``) before the step: forward hooks keep a stack of the group being run, and the autograd nodes each
    group creates are labelled so that backward ops count under the group that created them."""

    def __init__(self):
        super().__init__()
        self.count = OpCount()
        self._stack: list[tuple[str, set[int]]] = []  # (group, ids of the nodes of its inputs)
        self._labels: dict[int, str] = {}
        self._nodes: list = []  # keeps labelled nodes alive, so that their ids stay theirs during the step
        self._handles: list = []
        self._groups: dict[int, str] = {}
        self._compiled_nodes: set[int] = set()

    # forward: module stack; backward: node labels
    def watch(self, layer: nn.Module) -> None:
        """Label the ops of `layer` (an adapted LoraLayer) and of its parts. The hooks are global module hooks, so that
        no module gets hooks of its own: ``choose_path`` folds only a base layer without hooks (``variants._plain``)."""
        self._groups[id(layer.get_base_layer())] = BASE
        self._groups.update({id(m): DROPOUT for m in layer.lora_dropout.values()})
        self._groups.update({id(m): LORA_MODULES for d in (layer.lora_A, layer.lora_B) for m in d.values()})
        self._groups[id(layer)] = WRAPPER
        if not self._handles:
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

            self._handles = [register_module_forward_pre_hook(self._pre_hook),
                             register_module_forward_hook(self._post_hook)]

    def unwatch(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, module: nn.Module, args) -> None:
        group = self._groups.get(id(module))
        if group is not None:
            self._enter(group, args)

    def _post_hook(self, module: nn.Module, args, out) -> None:
        group = self._groups.get(id(module))
        if group is not None:
            self._leave(group, out)

    def _enter(self, group: str, args) -> None:
        inputs = [t.grad_fn for t in args if isinstance(t, Tensor) and t.grad_fn is not None]
        if group == WRAPPER:  # the layer's input was made outside it: its node is not the layer's
            for node in inputs:
                self._label(node, OUTSIDE)
        self._stack.append((group, {id(node) for node in inputs}))

    def _leave(self, group: str, out) -> None:
        _, made_before = self._stack.pop()
        todo = [t.grad_fn for t in (out if isinstance(out, (tuple, list)) else [out])
                if isinstance(t, Tensor) and t.grad_fn is not None]
        seen: set[int] = set()
        while todo:  # the nodes this module created: reachable from its output, not through its inputs' nodes;
            node = todo.pop()  # those an inner module created keep that module's label
            if node is None or id(node) in seen or id(node) in made_before:
                continue
            seen.add(id(node))
            if id(node) not in self._labels:
                self._label(node, group)
            todo.extend(n for n, _ in node.next_functions)

    def _label(self, node, group: str) -> None:
        self._labels[id(node)] = group
        self._nodes.append(node)

    def group(self) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            cls = getattr(node, "_forward_cls", None)
            if cls is not None and cls.__module__ == "loran.autograd":
                return FN_BACKWARD
            if "CompiledFunction" in node.name():
                return COMPILED + BACKWARD
            if node.name().endswith("AccumulateGrad"):
                return ENGINE
            label = self._labels.get(id(node))
            return OUTSIDE if label in (None, OUTSIDE) else label + BACKWARD
        frame = sys._getframe(2)
        while frame is not None:
            code = frame.f_code
            if code.co_name == "forward" and code.co_filename.endswith(_AUTOGRAD_FILE):
                return FN_FORWARD
            frame = frame.f_back
        return self._stack[-1][0] if self._stack else OUTSIDE

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        node = torch._C._current_autograd_node()
        if node is not None and "CompiledFunction" in node.name():  # inside a compiled backward: one call
            if id(node) not in self._compiled_nodes:
                self._compiled_nodes.add(id(node))
                self._nodes.append(node)
                self.count.compiled[COMPILED + BACKWARD] += 1
            return func(*args, **(kwargs or {}))
        group, name = self.group(), str(func)
        self.count.ops[group] += 1
        self.count.detail[(group, name)] += 1
        if func.is_view:
            self.count.views[group] += 1
        if name in NO_KERNEL:
            self.count.no_kernel[group] += 1
        if name in CASTS:
            self.count.casts[group] += 1
        return func(*args, **(kwargs or {}))

    def compiled_call(self, group: str, fn: Callable[[], object]):
        """Run a call of a torch.compile'd function (dynamo does not run under a dispatch mode) with this mode
        suspended, counting it as one compiled call of `group`."""
        self.count.compiled[group] += 1
        with _disable_current_modes():
            return fn()

    def compiled_backward_seen(self, node) -> None:
        """A compiled graph's backward node that dispatches no aten op the mode sees still counts once."""
        if id(node) not in self._compiled_nodes:
            self._compiled_nodes.add(id(node))
            self._nodes.append(node)
            self.count.compiled[COMPILED + BACKWARD] += 1


def _current_counter() -> OpCounter | None:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    mode = _get_current_dispatch_mode()
    return mode if isinstance(mode, OpCounter) else None


@contextmanager
def library_kernels_counted(counter: OpCounter):
    """While counting, let loran.autograd use its compiled element-wise kernels as it would without a dispatch mode
    (``KERNELS.use_compiled`` runs eager ops under any mode) and count each such call as one compiled call of the
    group that makes it. Patches two module globals for the duration; the library is otherwise untouched."""
    import loran.autograd as la

    original_mode, kernels = la._get_current_dispatch_mode, la.KERNELS
    if kernels.failed:
        yield
        return
    compiled = kernels._get()
    # a whole-update graph of the library, where there is one (results/host_time_proposal.patch), compiled by now
    whole = getattr(la, "FUSED", None)
    whole_compiled = getattr(whole, "compiled", None)

    def wrap(fn, group=None):
        def call(*args, **kwargs):
            where = group or (FN_BACKWARD if torch._C._current_autograd_node() is not None else FN_FORWARD)
            return counter.compiled_call(where, lambda: fn(*args, **kwargs))
        return call

    la._get_current_dispatch_mode = lambda: None if isinstance(original_mode(), OpCounter) else original_mode()
    kernels.compiled = tuple(wrap(fn) for fn in compiled)
    if whole_compiled is not None:
        whole.compiled = wrap(whole_compiled, COMPILED)
    try:
        yield
    finally:
        la._get_current_dispatch_mode = original_mode
        kernels.compiled = compiled
        if whole_compiled is not None:
            whole.compiled = whole_compiled


def count_ops(step: Callable[[], object], layers: Iterable[nn.Module]) -> OpCount:
    """The ops of one call of `step`, grouped, for the adapted `layers` (module docstring)."""
    counter = OpCounter()
    for layer in layers:
        counter.watch(layer)
    try:
        with counter, library_kernels_counted(counter):
            step()
    finally:
        counter.unwatch()
    return counter.count


# --- the bench's compiled residual update ------------------------------------------------------------------------


def residual_update_fn(layer: nn.Module, name: str, dtype: torch.dtype | None, with_base: bool = False) -> Callable:
    """The residual path's update of adapter `name` as one function of (x, A, B[, W0]): c s (x A^T) B^T + s x g(B A)^T,
    Z = B A and g(Z) in float32, the products in `dtype` (None: float32), the c-part as LoRA's in that dtype;
    `with_base`: plus the base x W0^T (bf16 weight, no bias), returning (base, update). Autocast off inside."""
    act, s = layer.loran_activation[name], float(layer.scaling[name])
    split = act.split
    c = split.slope

    def update(x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        pt = dtype or torch.float32
        xp = x.to(pt)
        w = (split.g(B.float() @ A.float()) * s).to(pt)
        y = xp @ w.T
        if c:
            y = y + ((xp @ A.to(pt).T) @ B.to(pt).T) * (s * c)
        return y

    if not with_base:
        return update

    def layer_fn(x: Tensor, A: Tensor, B: Tensor, W0: Tensor) -> tuple[Tensor, Tensor]:
        return x @ W0.T, update(x, A, B)

    return layer_fn


def compiled_update(layer: nn.Module, x: Tensor, mode: str = "update") -> Callable[[Tensor], Tensor]:
    """A forward for `layer` (one adapter, on the residual path for input x, per ``choose_path``) that computes the
    update by one torch.compile'd, checkpointed call (`mode` "update"; "layer": the base matmul in the same graph;
    "update-cudagraphs": mode="reduce-overhead"). A bench arm: ``measure_arm`` sets it as the layer instance's forward."""
    from torch.utils.checkpoint import checkpoint

    from loran.variants import Path, choose_path

    names = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(names) != 1:
        raise ValueError(f"compiled arms take one active adapter, got {names}")
    name = names[0]
    dev = x.device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=torch.is_autocast_enabled(dev)):
        plan = choose_path(layer, layer.lora_dropout[name](x), name)
    if plan.path is not Path.RESIDUAL:
        raise ValueError(f"compiled arms are for the residual path; this layer takes {plan.path.value}")
    base = layer.get_base_layer()
    with_base = mode == "layer"
    if with_base and not (type(base) is nn.Linear and base.bias is None):
        raise ValueError("the compiled-layer arm needs a plain nn.Linear base without bias")
    fn = residual_update_fn(layer, name, plan.dtype, with_base)

    def checkpointed(*args):
        return checkpoint(fn, *args, use_reentrant=False)

    options = {"mode": "reduce-overhead"} if mode == "update-cudagraphs" else {}
    compiled = torch.compile(checkpointed, fullgraph=True, dynamic=False, **options)
    A, B, dropout = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.lora_dropout[name]

    def call(*args):
        counter = _current_counter()
        with torch.autocast(dev, enabled=False):
            out = compiled(*args) if counter is None else counter.compiled_call(COMPILED, lambda: compiled(*args))
        if counter is not None:
            for t in out if isinstance(out, tuple) else (out,):
                if t.grad_fn is not None:
                    t.grad_fn.register_prehook(lambda grads, n=t.grad_fn: counter.compiled_backward_seen(n))
        return out

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        if with_base:
            result, update = call(x, A, B, base.weight)
        else:
            result = base(x)
            update = call(dropout(x), A, B)
        return result + update.to(result.dtype)

    return forward


# --- arms --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmSpec:
    """One configuration of the layer: `kind` "peft" (PEFT's LoraConfig) or "loran" (LoranConfig with `activation`),
    input and base `dtype` ("bf16", "fp32"), bf16 `autocast`, adapter `dropout`, update `policy`, `compiled` (None: the
    library's path; "update", "layer", "update-cudagraphs": the bench's compiled arms), `one_block`: the library's path
    with its row blocks and fused-kernel chunks as large as the layer (``library_settings``), a bench setting."""

    name: str
    kind: str
    activation: str
    dtype: str
    autocast: bool
    dropout: float = 0.0
    policy: str = "float32"
    compiled: str | None = None
    one_block: bool = False


def arm_specs(policies: Iterable[str] = ("float32", "autocast"), base: str = "bf16", device: str = "cpu",
              compiled: bool = True, fp32: bool = True) -> list[ArmSpec]:
    """The arms of the module docstring."""
    arms = [ArmSpec("peft lora bf16", "peft", "identity", "bf16", True)]
    for policy in policies:
        arms += [ArmSpec(f"qlora bf16 {policy}", "loran", "identity", "bf16", True, policy=policy),
                 ArmSpec(f"loran bf16 {policy}", "loran", "sinter", "bf16", True, policy=policy)]
        arms.append(ArmSpec(f"loran bf16 {policy} one block", "loran", "sinter", "bf16", True, policy=policy,
                            one_block=True))
        if compiled:
            modes = ["update"] + (["layer"] if base == "bf16" else []) + (["update-cudagraphs"] if device == "cuda"
                                                                          else [])
            arms += [ArmSpec(f"loran bf16 {policy} compiled {m}", "loran", "sinter", "bf16", True, policy=policy,
                             compiled=m) for m in modes]
    if fp32:
        arms += [ArmSpec("lora fp32", "loran", "identity", "fp32", False),
                 ArmSpec("loran fp32", "loran", "sinter", "fp32", False),
                 ArmSpec("loran fp32 dropout 0.1", "loran", "sinter", "fp32", False, dropout=0.1)]
    return arms


def build_arm(spec: ArmSpec, d: int, r: int, device: str, base: str = "bf16", seed: int = 0) -> tuple[nn.Module,
                                                                                                       nn.Module]:
    """(model, its adapted layer) for an arm: a frozen d x d layer (bf16 arms: nn.Linear in bf16, or NF4 with `base`
    "nf4"; fp32 arms: nn.Linear in fp32), adapted with r and alpha 16, in train mode, B drawn at a trained-like scale."""
    from peft import LoraConfig, get_peft_model

    from loran import LoranConfig
    from loran.bench.adapter import Proj

    torch.manual_seed(seed)
    dtype = torch.bfloat16 if spec.dtype == "bf16" else torch.float32
    proj = Proj(d, d).to(device=device, dtype=dtype)
    if base == "nf4" and spec.dtype == "bf16":
        from loran.bench.gpu import _nf4

        proj.proj = _nf4(proj.proj, device)
        proj.is_loaded_in_4bit = True
    kwargs = dict(r=r, lora_alpha=16, lora_dropout=spec.dropout, target_modules=["proj"])
    if spec.kind == "peft":
        model = get_peft_model(proj, LoraConfig(**kwargs))
    else:
        model = get_peft_model(proj, LoranConfig(**kwargs, activation=spec.activation, update_dtype=spec.policy))
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = (torch.randn(p.shape, generator=gen) * 0.02).to(device=p.device, dtype=p.dtype)
    return model.train(), model.get_submodule("base_model.model.proj")


def make_step(model: nn.Module, spec: ArmSpec, x: Tensor, grad_y: Tensor) -> Callable[[], None]:
    """One forward + backward of the arm's model on x; gradients dropped afterwards (as an optimizer step would)."""
    dev = x.device.type
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=spec.autocast):
            y = model(x)
        y.backward(grad_y)
        x.grad = None
        for p in params:
            p.grad = None

    return step


# --- timing ------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, repeats: int) -> tuple[list[float], list[float]]:
    """(host seconds, wall seconds) of each of `repeats` steps: host until step() returns (synchronised before it),
    wall until the device is done too (the same on a CPU)."""
    host, wall = [], []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        returned = time.perf_counter()
        _sync(device)
        host.append(returned - start)
        wall.append(time.perf_counter() - start)
    return host, wall


def dispatch_us(device: str = "cpu", n: int = 2000) -> float:
    """Microseconds per trivial aten op (an in-place add on a 1-element tensor) on `device`: this machine's cost of
    dispatching one op with nothing to compute (median of 5 runs of n)."""
    dev = torch.device(device)
    t = torch.ones(1, device=dev)
    runs = []
    for _ in range(5):
        _sync(dev)
        start = time.perf_counter()
        for _ in range(n):
            t.add_(1)
        _sync(dev)
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


def choose_path_us(layer: nn.Module, x: Tensor, autocast: bool, n: int = 500) -> float:
    """Microseconds of the path decision the layer's forward makes: ``choose_path`` for the layer, and on PEFT's
    forward once more per adapter (on x: the decision does not read the values)."""
    from loran.variants import LoranVariant, Path, choose_path

    names = [a for a in layer.active_adapters if a in layer.lora_A]
    if not all(isinstance(layer.lora_variant.get(a), LoranVariant) for a in names):
        return 0.0
    dev = x.device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
        unfolded = choose_path(layer, x).path is not Path.FOLDED
        start = time.perf_counter()
        for _ in range(n):
            choose_path(layer, x)
            if unfolded:
                for a in names:
                    choose_path(layer, x, a)
        return (time.perf_counter() - start) / n * 1e6


# --- CUDA: device time from the profiler -------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceEvent:
    """A profiler event reduced to what ``device_summary`` reads."""

    device: str  # "cuda", "cpu", ...
    us: float
    activity: str = ""


def device_summary(events: Iterable[DeviceEvent], steps: int) -> tuple[float, float]:
    """(device events per step, device ms per step) from profiler events: the events on the GPU (kernels, memcpy,
    memset), their durations summed (overlap between streams counted twice: none in these steps)."""
    on_device = [e for e in events if e.device == "cuda"]
    return len(on_device) / steps, sum(e.us for e in on_device) / steps / 1e3


def profiled_device(step: Callable[[], None], device: torch.device, steps: int = 5) -> tuple[float, float]:
    """(device events per step, device kernel ms per step) of `steps` steps under torch.profiler (CUDA only)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    events = [DeviceEvent("cuda" if e.device_type == DeviceType.CUDA else "cpu",
                          e.time_range.end - e.time_range.start, str(getattr(e, "activity_type", "")))
              for e in prof.events()]
    return device_summary(events, steps)


# --- one arm, all arms -------------------------------------------------------------------------------------------


@dataclass
class HostRow:
    """One arm's figures (module docstring); `error`: why the arm did not run (its figures then stay empty)."""

    arm: str
    path: str = ""
    ops: int = 0
    launching: int = 0
    views: int = 0
    casts: int = 0
    compiled_calls: int = 0
    host_ms: float = 0.0
    host_min_ms: float = 0.0
    wall_ms: float = 0.0
    device_ms: float | None = None
    device_events: float | None = None
    choose_path_us: float = 0.0
    compile_s: float = 0.0
    peak_mib: float | None = None
    groups: dict = field(default_factory=dict)
    error: str = ""
    note: str = ""


def arm_path(model: nn.Module, step: Callable[[], None], spec: ArmSpec) -> str:
    """The path the arm's layer took on one step, as ``cost.record_paths`` records it ("unfolded" paths by the
    adapter's path), with " (compiled ...)" for the bench's compiled arms."""
    runs = cost.record_paths(model, step)
    path = "+".join(sorted({run.path for run in runs.values()}))
    return path + (f" (bench: compiled {spec.compiled})" if spec.compiled else "")


def measure_arm(spec: ArmSpec, d: int, r: int, tokens: int, device: str = "cpu", base: str = "bf16",
                warmup: int = 3, repeats: int = 30, seed: int = 0) -> HostRow:
    """The figures of one arm (module docstring)."""
    dev = torch.device(device)
    model, layer = build_arm(spec, d, r, device, base, seed)
    dtype = torch.bfloat16 if spec.dtype == "bf16" else torch.float32
    gen = torch.Generator(device=dev).manual_seed(seed + 2)
    x = torch.randn(tokens, d, generator=gen, device=dev, dtype=dtype).requires_grad_()
    grad_y = torch.randn(tokens, d, generator=gen, device=dev, dtype=dtype)
    step = make_step(model, spec, x, grad_y)
    row = HostRow(spec.name)
    start = time.perf_counter()
    if spec.compiled:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=spec.autocast):
            layer.forward = compiled_update(layer, x, spec.compiled)  # the instance's own forward: hooks still run
    for _ in range(max(1, warmup)):  # compiles here (the library's fused kernels, or the compiled arm)
        step()
    _sync(dev)
    row.compile_s = round(time.perf_counter() - start, 2)
    row.path = arm_path(model, step, spec)
    counted: list[OpCount] = []
    counted_path = arm_path(model, lambda: counted.append(count_ops(step, [layer])), spec)
    if counted_path != row.path:  # counting must not change the path it counts
        raise RuntimeError(f"the layer took {counted_path} while counted, {row.path} otherwise")
    count = counted[0]
    row.ops, row.launching, row.groups = count.total, count.launching, count.by_group()
    row.views, row.casts = sum(count.views.values()), sum(count.casts.values())
    row.compiled_calls = sum(count.compiled.values())
    host, wall = time_steps(step, dev, repeats)
    row.host_ms, row.host_min_ms = statistics.median(host) * 1e3, min(host) * 1e3
    row.wall_ms = statistics.median(wall) * 1e3
    if dev.type == "cuda":
        try:  # the profiler needs CUPTI: without it, the arm's other figures still stand
            row.device_events, row.device_ms = profiled_device(step, dev)
        except Exception as err:  # noqa: BLE001
            row.note = f"no device time: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        row.peak_mib = cuda_peak_bytes(step, dev) / 2**20
    row.choose_path_us = choose_path_us(layer, x, spec.autocast)
    return row


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during one step beyond what was allocated before it (CUDA)."""
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


@contextmanager
def library_settings(compile_mode: str | None = None, block_elements: int | None = None):
    """loran.autograd's module settings for the block, restored after (None: left as they are):
    - `compile_mode`: COMPILE (LORAN_COMPILE: "auto", "always", "never"). "always" at a small d keeps the op structure
      the path has at d=256 and above (one fused kernel per block) while the element-wise compute shrinks: the host
      time left is overhead;
    - `block_elements`: BLOCK_ELEMENTS, COMPILED_CHUNK_ELEMENTS and CHUNK_ELEMENTS (elements per matmul block, per
      fused kernel call, per eager chunk); at least d_out x d_in: one block, one fused call per pass, with transient
      d_out x d_in buffers."""
    import loran.autograd as la

    names = ("COMPILE", "BLOCK_ELEMENTS", "COMPILED_CHUNK_ELEMENTS", "CHUNK_ELEMENTS")
    before = {name: getattr(la, name) for name in names}
    if compile_mode is not None:
        la.COMPILE = compile_mode
    if block_elements is not None:
        la.BLOCK_ELEMENTS = la.COMPILED_CHUNK_ELEMENTS = la.CHUNK_ELEMENTS = block_elements
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(la, name, value)


def measure(d: int = 256, r: int = 8, tokens: int = 16, device: str = "cpu", base: str = "bf16",
            arms: list[ArmSpec] | None = None, warmup: int = 3, repeats: int = 30, seed: int = 0,
            log: Callable[[str], None] | None = None, kernels: str | None = None) -> list[HostRow]:
    """Every arm's figures; an arm that fails is reported with its error, the others still run. `kernels`: the
    library's compile mode for its fused element-wise kernels during the run (``library_settings``)."""
    rows = []
    for spec in arms if arms is not None else arm_specs(base=base, device=device):
        try:
            with library_settings(kernels, d * d if spec.one_block else None):
                row = measure_arm(spec, d, r, tokens, device, base, warmup, repeats, seed)
        except Exception as err:  # noqa: BLE001 - a compiled arm may fail where inductor cannot run: say so, go on
            row = HostRow(spec.name, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
        rows.append(row)
        if log:
            log(f"# {row.arm}: " + (row.error or f"{row.path}, {row.ops} ops, {row.host_ms:.3f} host ms"))
    return rows


# --- output ------------------------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(rows: list[HostRow]) -> str:
    """The per-arm table: path, ops (launching, views, casts), compiled calls, host / wall / device ms."""
    out = ["| arm | path | ops | launching | views | casts | compiled calls | host ms | host min ms | wall ms "
           "| device ms | device events | peak MiB | choose_path us | warm-up s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.error:
            out.append(f"| {row.arm} | failed: {row.error} |" + " - |" * 13)
            continue
        out.append(f"| {row.arm} | {row.path} | {row.ops} | {row.launching} | {row.views} | {row.casts} "
                   f"| {row.compiled_calls} | {row.host_ms:.3f} | {row.host_min_ms:.3f} | {row.wall_ms:.3f} "
                   f"| {_ms(row.device_ms)} | {'-' if row.device_events is None else f'{row.device_events:g}'} "
                   f"| {'-' if row.peak_mib is None else f'{row.peak_mib:.1f}'} | {row.choose_path_us:.0f} "
                   f"| {row.compile_s:.1f} |")
    return "\n".join(out)


def group_table(rows: list[HostRow]) -> str:
    """Ops per group (columns) and arm (rows): "ops" or "ops+compiled calls c"."""
    groups = [g for g in GROUPS if any(g in row.groups for row in rows)]
    groups += sorted({g for row in rows for g in row.groups} - set(groups))
    out = ["| arm | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for row in rows:
        if row.error:
            continue
        cells = []
        for g in groups:
            c = row.groups.get(g)
            if not c:
                cells.append("-")
                continue
            cell = str(c["ops"]) + (f" ({c['casts']} casts)" if c["casts"] else "")
            cells.append(cell + (f" + {c['compiled']}c" if c["compiled"] else ""))
        out.append(f"| {row.arm} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def figures(rows: list[HostRow]) -> dict:
    """Flat name -> value figures for scripts/gpu_check.py's report: per arm its path, ops, host, wall and device ms."""
    out = {}
    for row in rows:
        key = row.arm.replace(" ", "_")
        if row.error:
            out[f"{key}_error"] = row.error
            continue
        out.update({f"{key}_path": row.path, f"{key}_ops": row.ops, f"{key}_launching": row.launching,
                    f"{key}_compiled_calls": row.compiled_calls, f"{key}_host_ms": round(row.host_ms, 3),
                    f"{key}_wall_ms": round(row.wall_ms, 3)})
        if row.device_ms is not None:
            out.update({f"{key}_device_ms": round(row.device_ms, 3), f"{key}_device_events": row.device_events})
        if row.peak_mib is not None:
            out[f"{key}_peak_mib"] = round(row.peak_mib, 1)
        if row.note:
            out[f"{key}_note"] = row.note
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--base", default="bf16", choices=["bf16", "nf4", "auto"],
                   help="the bf16 arms' frozen layer; auto: nf4 with CUDA and bitsandbytes, else bf16")
    p.add_argument("--policies", default="float32,autocast", help="update precision policies of the bf16 arms")
    p.add_argument("--no-compile", action="store_true", help="leave out the bench's compiled arms")
    p.add_argument("--no-fp32", action="store_true", help="leave out the fp32 arms")
    p.add_argument("--arms", help="only the arms whose name contains one of these (comma-separated)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--kernels", choices=["auto", "always", "never"],
                   help="loran.autograd.COMPILE for the run (default: as LORAN_COMPILE says; always: the fused kernels "
                        "also below 2**16 weights, for a small-d overhead run)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--json", help="write the rows, the figures and the machine to this file")
    args = p.parse_args(argv)
    if args.base == "auto":
        import importlib.util

        args.base = "nf4" if args.device == "cuda" and importlib.util.find_spec("bitsandbytes") else "bf16"
    return args


def main(argv=None) -> list[HostRow]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from loran.bench.adapter import header

    info = header("host_time", argv, "wall")
    info.update(d=args.d, r=args.r, tokens=args.tokens, device=args.device, base=args.base, kernels=args.kernels,
                dispatch_us=round(dispatch_us(args.device), 2))
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    print(f"# one trivial aten op on {args.device}: {info['dispatch_us']:.2f} us", flush=True)
    arms = arm_specs([p for p in args.policies.split(",") if p], args.base, args.device, not args.no_compile,
                     not args.no_fp32)
    if args.arms:
        wanted = [w.strip() for w in args.arms.split(",")]
        arms = [a for a in arms if any(w in a.name for w in wanted)]
    rows = measure(args.d, args.r, args.tokens, args.device, args.base, arms, args.warmup, args.repeats,
                   log=lambda line: print(line, flush=True), kernels=args.kernels)
    print(table(rows))
    print()
    print(group_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": [asdict(r) for r in rows],
                                               "figures": figures(rows)}, indent=1))
    return rows


if __name__ == "__main__":
    main()
