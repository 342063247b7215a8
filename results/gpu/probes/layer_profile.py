import time, torch
from torch.profiler import profile, ProfilerActivity
from loran import get_loran_model
from loran.bench import adapter as bench_adapter
from loran.bench.gpu import adapter_config, ARMS
import loran.autograd as ag
dev = torch.device("cuda")
d, r, tokens = 4096, 64, 2048
for policy in ("float32", "autocast"):
    models = {}
    for arm, act in ARMS.items():
        torch.manual_seed(0)
        base = bench_adapter.Proj(d, d).to(device=dev, dtype=torch.bfloat16)
        models[arm] = get_loran_model(base, adapter_config(act, r, 0.0, policy, ["proj"])).train()
    x = torch.randn(tokens, d, device=dev, dtype=torch.bfloat16).requires_grad_()
    gy = torch.randn(tokens, d, device=dev, dtype=torch.bfloat16)
    def fwd(m):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return m(x)
    def step(m):
        y = fwd(m); y.backward(gy); x.grad = None
        for p in m.parameters(): p.grad = None
    for arm, m in models.items():
        for _ in range(4): step(m)
        torch.cuda.synchronize()
        for name, fn in (("fwd", lambda: fwd(m)), ("step", lambda: step(m))):
            t = []
            for _ in range(10):
                torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); t.append(time.perf_counter() - t0)
            print(policy, arm, name, f"{1e3*sorted(t)[5]:.3f} ms")
    m = models["loran"]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5): step(m)
        torch.cuda.synchronize()
    print(policy, "KERNELS.failed", getattr(getattr(ag, "KERNELS", None), "failed", "n/a"))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
