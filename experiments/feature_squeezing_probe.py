"""Probe a feature-squeezing trial of a run with attacks beyond its cascade.

    python experiments/feature_squeezing_probe.py RUN N TRIAL_ID QUERIES

On the first N test images: APGD-CE-100 on the bit-depth-squeezed classifier (rounding passed
straight through), its adversarials also "snapped" towards their squeezed values inside the
ε ball, each judged by the detector's ``predict``; then Square with QUERIES queries on the
joint decision ("misclassified and accepted") of the points still robust. Prints the robust
accuracy after each (docs/evaluation.md: 82.5 % -> 69.5 % on the default run's 1-bit trial).
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
from orchestrator.evaluate import restore, load_spec_file, eval_data, local_checkpoint  # noqa: E402
from defenses.core.base import predict_labels  # noqa: E402
from defenses.attacks import frozen_eval  # noqa: E402
from defenses.feature_squeezing import bit_depth  # noqa: E402
import torchattacks  # noqa: E402
torch.set_num_threads(1)
run = Path(sys.argv[1]); n = int(sys.argv[2])
spec = load_spec_file(run / "spec.json")
rec = [json.load(open(f)) for f in (run / "records").glob("*.json")]
r = [x for x in rec if x["trial_id"] == sys.argv[3]][0]
s = restore(local_checkpoint(r["checkpoint"]), spec, run, torch.device("cpu"))
d = s.defense; eps = spec.threat_model.eps
x, y = eval_data(s, n)
def judge(adv):
    p, rej = predict_labels(d, adv, 250)
    return (p == y) | rej
with frozen_eval(d.model):
    p0, r0 = predict_labels(d, x, 250); ok = (p0 == y) & ~r0
    print("clean", ok.float().mean().item())
    robust = ok.clone()
    f = d.model
    class G(torch.nn.Module):
        def forward(self, z): return f(bit_depth(z, d.params.bit_depth, straight_through=True))
    t = time.time()
    atk = torchattacks.APGD(G(), eps=eps, steps=100, loss="ce")
    adv = atk(x, y)
    snap = torch.min(torch.max(bit_depth(adv, d.params.bit_depth), x - eps), x + eps).clamp(0, 1)
    for name, a in (("apgd_on_f_bit", adv), ("snapped", snap)):
        j = judge(a); robust &= j
        print(name, "robust-if-alone", (ok & j).float().mean().item(), "cumulative", robust.float().mean().item(), round(time.time()-t))
    t = time.time()
    sq = d.blackbox_attack(eps, int(sys.argv[4]))
    idx = robust.nonzero().squeeze(1)
    a = sq(x[idx], y[idx]); pj, rj = predict_labels(d, a, 250)
    robust[idx[(pj != y[idx]) & ~rj]] = False
    print("joint square", sys.argv[4], "cumulative", robust.float().mean().item(), round(time.time() - t))
