import time, torch
from loran import get_loran_model
from loran.bench import adapter as bench_adapter
from loran.bench.gpu import adapter_config, ARMS
dev = torch.device("cuda"); d, r = 4096, 64
def run(tokens, policy, tf32):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    out = {}
    for arm, act in ARMS.items():
        torch.manual_seed(0)
        m = get_loran_model(bench_adapter.Proj(d, d).to(dev, torch.bfloat16), adapter_config(act, r, 0.0, policy, ["proj"])).train()
        x = torch.randn(tokens, d, device=dev, dtype=torch.bfloat16).requires_grad_()
        gy = torch.randn(tokens, d, device=dev, dtype=torch.bfloat16)
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = m(x)
            y.backward(gy); x.grad = None
            for p in m.parameters(): p.grad = None
        for _ in range(4): step()
        torch.cuda.synchronize(); t = []; c = []
        for _ in range(10):
            t0, c0 = time.perf_counter(), time.process_time(); step(); c1 = time.process_time(); torch.cuda.synchronize(); t.append(time.perf_counter() - t0); c.append(c1 - c0)
        out[arm] = (1e3 * sorted(t)[5], 1e3 * sorted(c)[5])
    print(f"tokens {tokens:6d} policy {policy:8s} tf32 {tf32!s:5s} qlora {out['qlora'][0]:7.3f} ms (cpu {out['qlora'][1]:.3f}) loran {out['loran'][0]:7.3f} ms (cpu {out['loran'][1]:.3f}) ratio {out['loran'][0]/out['qlora'][0]:.2f}", flush=True)
for tokens in (2048, 8192, 32768):
    for policy, tf32 in (("float32", False), ("float32", True), ("autocast", False)):
        run(tokens, policy, tf32)
