"""loran.bench.host_time: the op counter against counts derived by hand, the path each arm reports against
choose_path's plan, the report naming the path, and the CUDA summary on synthetic profiler events."""
import pytest
import torch
from torch import nn

from loran.bench import host_time as ht
from loran.variants import Path, choose_path

D, R, T = 32, 4, 4


@pytest.fixture(autouse=True)
def row_blocked_residual_path(monkeypatch):
    """These counts are the library's row-blocked residual path; results/host_time_proposal.patch would add a whole
    update graph behind LORAN_FUSED_UPDATE (default off): pinned off here, whatever the environment says."""
    import loran.autograd as la

    monkeypatch.setattr(la, "FUSED_UPDATE", "never", raising=False)


def fwd_bwd(module, x):
    grad_y = torch.ones(x.shape[0], module.out_features)

    def step():
        module(x).backward(grad_y)
        x.grad = None
    return step


def test_a_plain_linear_step_counts_as_derived_by_hand():
    """y = x W^T (F.linear, no bias: aten.t of W, then mm); backward with W frozen: dL/dx = g W (t of W^T, mm);
    x a leaf: the engine hands its gradient over (detach). Nothing else."""
    lin = nn.Linear(D, 8, bias=False).requires_grad_(False)
    x = torch.randn(T, D, requires_grad=True)
    count = ht.count_ops(fwd_bwd(lin, x), [])
    assert dict(count.detail) == {(ht.OUTSIDE, "aten.t.default"): 2, (ht.OUTSIDE, "aten.mm.default"): 2,
                                  (ht.ENGINE, "aten.detach.default"): 1}
    assert (count.total, count.launching, sum(count.views.values())) == (5, 2, 3)
    # W trained too: dL/d(W^T) = x^T g, which aten computes as (g^T x)^T to give W^T's strides (t, mm, t), then
    # TBackward turns it into dL/dW (t), and the engine hands it over (detach)
    lin.weight.requires_grad_(True)
    count = ht.count_ops(fwd_bwd(lin, x), [])
    assert dict(count.detail) == {(ht.OUTSIDE, "aten.t.default"): 5, (ht.OUTSIDE, "aten.mm.default"): 3,
                                  (ht.ENGINE, "aten.detach.default"): 2}
    assert count.launching == 3


def _arm(name):
    return next(a for a in ht.arm_specs(device="cpu") if a.name == name)


def test_peft_lora_in_fp32_groups_its_ops_by_where_they_come_from():
    """PEFT's LoRA, fp32, no dropout: base F.linear (t, mm), lora_A and lora_B (t, mm each), PEFT's glue (* s, +);
    backward of the glue: the * s only (the sum passes its gradient on)."""
    spec = ht.ArmSpec("lora fp32 peft", "peft", "identity", "fp32", False)
    model, layer = ht.build_arm(spec, D, R, "cpu")
    x = torch.randn(T, D, requires_grad=True)
    count = ht.count_ops(ht.make_step(model, spec, x, torch.randn(T, D)), [layer])
    assert (count.ops[ht.BASE], count.ops[ht.LORA_MODULES], count.ops[ht.WRAPPER]) == (2, 4, 2)
    assert count.ops[ht.WRAPPER + ht.BACKWARD] == 1 and count.ops[ht.OUTSIDE] == 0
    assert {name for (group, name) in count.detail if group == ht.WRAPPER} == {"aten.mul.Tensor", "aten.add.Tensor"}


def _plan_path(layer, x, autocast: bool) -> str:
    """What choose_path says, asked directly: the layer's plan, and on PEFT's forward the adapter's."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plan = choose_path(layer, x)
        if plan.path is not Path.UNFOLDED:
            return plan.path.value
        return choose_path(layer, layer.lora_dropout["default"](x), "default").path.value


@pytest.mark.parametrize("name", ["qlora bf16 float32", "qlora bf16 autocast", "loran bf16 autocast", "lora fp32",
                                  "loran fp32", "loran fp32 dropout 0.1"])
def test_the_path_reported_is_choose_paths_plan_and_counting_does_not_change_it(name):
    spec = _arm(name)
    with ht.library_settings("never"):  # no compile in the unit tests; the op structure is the same with it
        row = ht.measure_arm(spec, D, R, T, warmup=1, repeats=1)
    assert not row.error
    model, layer = ht.build_arm(spec, D, R, "cpu")
    x = torch.randn(T, D, dtype=torch.bfloat16 if spec.dtype == "bf16" else torch.float32, requires_grad=True)
    assert row.path == _plan_path(layer, x, spec.autocast)
    expected = {"qlora bf16 float32": "lora cast", "qlora bf16 autocast": "lora", "loran bf16 autocast": "residual",
                "lora fp32": "lora", "loran fp32": "folded", "loran fp32 dropout 0.1": "residual"}[name]
    assert row.path == expected
    assert row.ops > 0 and row.host_ms > 0 and row.compiled_calls == 0
    if expected == "folded":  # the base layer's weight is folded in: the base module never runs
        assert ht.BASE not in row.groups and ht.FN_FORWARD in row.groups


def test_the_report_names_each_arms_path_and_its_figures():
    rows = [ht.HostRow("loran fp32", "folded", ops=32, launching=6, views=23, compiled_calls=2, host_ms=1.0,
                       host_min_ms=0.9, wall_ms=1.0, groups={ht.FN_FORWARD: {"ops": 8, "views": 5, "casts": 0,
                                                                             "compiled": 1}}),
            ht.HostRow("loran bf16 autocast compiled update", error="BackendCompilerFailed: no compiler")]
    text = ht.table(rows)
    assert "| loran fp32 | folded | 32 | 6 | 23 | 0 | 2 | 1.000 |" in text
    assert "| loran bf16 autocast compiled update | failed: BackendCompilerFailed: no compiler |" in text
    assert "| loran fp32 | 8 + 1c |" in ht.group_table(rows)
    fig = ht.figures(rows)
    assert fig["loran_fp32_path"] == "folded" and fig["loran_fp32_ops"] == 32 and fig["loran_fp32_host_ms"] == 1.0
    assert fig["loran_bf16_autocast_compiled_update_error"].startswith("BackendCompilerFailed")


def test_device_summary_counts_device_events_per_step():
    events = [ht.DeviceEvent("cpu", 50.0), ht.DeviceEvent("cuda", 100.0, "kernel"),
              ht.DeviceEvent("cuda", 300.0, "kernel"), ht.DeviceEvent("cuda", 200.0, "gpu_memset")]
    assert ht.device_summary(events, steps=2) == (1.5, 0.3)


def test_library_settings_are_restored():
    import loran.autograd as la

    before = la.COMPILE, la.BLOCK_ELEMENTS, la.COMPILED_CHUNK_ELEMENTS, la.CHUNK_ELEMENTS
    with pytest.raises(RuntimeError):
        with ht.library_settings("always", 64):
            assert (la.COMPILE, la.BLOCK_ELEMENTS, la.COMPILED_CHUNK_ELEMENTS, la.CHUNK_ELEMENTS) == ("always", 64, 64, 64)
            raise RuntimeError
    assert (la.COMPILE, la.BLOCK_ELEMENTS, la.COMPILED_CHUNK_ELEMENTS, la.CHUNK_ELEMENTS) == before


def test_one_block_halves_the_residual_paths_blocks():
    """d=32 with blocks of 256 elements: 4 row blocks of 8 rows; one block of d x d: 1. Each block costs its own ops
    in forward and backward, so one block counts fewer."""
    spec = _arm("loran bf16 float32")
    model, layer = ht.build_arm(spec, D, R, "cpu")
    x = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
    step = ht.make_step(model, spec, x, torch.randn(T, D, dtype=torch.bfloat16))
    counts = {}
    for elements in (256, D * D):
        with ht.library_settings("never", elements):
            counts[elements] = ht.count_ops(step, [layer])
    assert counts[256].ops[ht.FN_FORWARD] > counts[D * D].ops[ht.FN_FORWARD]
    assert counts[256].ops[ht.FN_BACKWARD] > counts[D * D].ops[ht.FN_BACKWARD]
    assert counts[256].ops[ht.BASE] == counts[D * D].ops[ht.BASE] == 2


def test_a_fused_kernel_call_counts_once_and_leaves_the_path_alone(monkeypatch):
    """With loran.autograd's compiled element-wise kernels on, the residual path makes one fused call per block in
    forward and one in backward; the counter sees each as one compiled call (not its inside) and the layer still
    takes the path it takes uncounted. The kernels' uncompiled Python stands in for torch.compile's output here (the
    same call sites; compiling them costs 15 s on a cold cache; tests/test_gpu_check.py's host smoke compiles)."""
    import loran.autograd as la

    monkeypatch.setattr(la.KERNELS, "compiled", (la._fused_weight_kernel, la._fused_grad_kernel))
    spec = _arm("loran fp32 dropout 0.1")
    with ht.library_settings("always"):
        row = ht.measure_arm(spec, D, R, T, warmup=1, repeats=1)
    assert not row.error and row.path == "residual"
    assert row.groups[ht.FN_FORWARD]["compiled"] == row.groups[ht.FN_BACKWARD]["compiled"] == 1
    assert row.compiled_calls == 2


def test_a_cast_peft_makes_before_the_dropout_counts_as_peft_glue_not_dropout():
    """Under autocast PEFT casts x to the adapter's dtype before the adapter's dropout (nn.Identity at p = 0, no op):
    the cast's backward belongs to PEFT's forward, not to the dropout module it feeds."""
    spec = _arm("qlora bf16 autocast")
    model, layer = ht.build_arm(spec, D, R, "cpu")
    x = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
    count = ht.count_ops(ht.make_step(model, spec, x, torch.randn(T, D, dtype=torch.bfloat16)), [layer])
    assert count.ops[ht.DROPOUT] == count.ops[ht.DROPOUT + ht.BACKWARD] == 0
    assert count.detail[(ht.WRAPPER + ht.BACKWARD, "aten._to_copy.default")] == 1


def test_the_profiler_path_runs_and_finds_no_device_events_on_the_cpu():
    x = torch.randn(16, 16)
    assert ht.profiled_device(lambda: (x @ x).sum(), torch.device("cpu"), steps=2) == (0.0, 0.0)
