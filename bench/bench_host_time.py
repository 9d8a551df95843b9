"""Host time per small call (8 x 16, one thread; forward + backward, 10th percentile of 1500
calls): the losses' single ops with a C++ autograd formula against their forward ops with the
Python autograd still registered for them, in one run. On a GPU a small call costs at least
this much host time. `python bench/bench_host_time.py` (about a minute); prints a table."""
import time, torch, subprocess
from fastloss import ops
from fastloss.ops import metric_losses as M
torch.manual_seed(0); torch.set_num_threads(1)
def bench(f, n=1500):
    for _ in range(100): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[n//10]*1e6
F = torch.ops.fastloss
s = torch.randn(8, 16, requires_grad=True); t = torch.randn(8, 16); y = torch.randint(0, 16, (8,))
lb = torch.randn(8, requires_grad=True); yb = torch.randint(0, 2, (8,)).float()
gr = lambda out, x: torch.autograd.grad(out, x)
rows = {
 "kd_loss": (lambda: gr(ops.kd_loss(s, t, 2.0), s), lambda: gr(F.kd_forward(s, t, 0, 2.0, 0.5)[0].mean(), s)),
 "topk_kl_loss": (lambda: gr(ops.topk_kl_loss(s, t, 4, 2.0), s), lambda: gr(F.topk_kl_forward(s, t, 4, 2.0, False, True)[0].mean(), s)),
 "pld_loss": (lambda: gr(ops.pld_loss(s, t, y, 2.0), s), lambda: gr(F.pld_forward(s, t, y, 2.0, -100, True)[0].mean(), s)),
 "dice_loss (softmax)": (lambda: gr(ops.dice_loss(s, y), s), lambda: gr(F.dice_softmax_forward(s, y, 0.0, 1.0, 0.0, -100).mean(), s)),
 "mw_auc_loss": (lambda: gr(ops.mw_auc_loss(s[0], s[1]), s), lambda: gr(F.mw_auc_forward(s[:1], s[1:2], True)[0].mean(), s)),
 "anyloss": (lambda: gr(ops.anyloss(lb, yb), lb), lambda: gr((1 - M._metric(*F.confusion_sums(lb[:, None], yb[:, None], 73.0, True), "f1", 1.0)).mean(), lb)),
 "dice_loss (sigmoid)": (lambda: gr(ops.dice_loss(lb, yb), lb), lambda: gr(F.dice_sigmoid_forward(lb[:, None], yb[:, None], 0.0, 1.0, 0.0).mean(), lb)),
 "cross_entropy": (lambda: gr(ops.cross_entropy(s, y), s), None),
}
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print("commit", commit, "torch", torch.__version__)
for k, (new, old) in rows.items():
    a = bench(new); b = bench(old) if old else None
    print(f"{k:22s} single op {a:6.1f} us" + (f"   forward op + Python autograd {b:6.1f} us" if b else ""))
