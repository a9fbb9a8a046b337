"""B2: our PGD vs torchattacks PGD at identical settings (and the robust accuracy each
reaches), our early-stopping APGD-CE vs torchattacks' APGD-CE (same), and the training steps of the saliency defenses (SAD, SAT, ATAT) over the plain
PGD-AT step, all through the real code (``build_setup`` + ``train_epoch`` on one batch)."""
from __future__ import annotations

import logging
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F

from bench.common import fmt_ratio, interleave, load_line, ratio, section, stats, table
from defenses.core import data as data_lib
from defenses.core import models, registry
from defenses.attacks.pgd import PGD

log = logging.getLogger(__name__)
SETTINGS = {
    # attack: images, steps, rounds, ε (mid-range robust accuracy on a briefly trained standard
    # model, so that a difference in attack strength shows); steps of the defenses: K, rounds
    "tiny": dict(n=32, steps=2, reps=1, eps=0.1, train=256, k=1, step_reps=1, batch=16, apgd=5),
    "quick": dict(n=128, steps=10, reps=3, eps=0.1, train=1000, k=3, step_reps=2, batch=128, apgd=50),
    "full": dict(n=1000, steps=20, reps=5, eps=0.1, train=4000, k=7, step_reps=5, batch=128, apgd=100),
}
DEFENSES = ("pgd_at", "sad", "sat", "atat")


def trained_model(n: int, device: torch.device) -> torch.nn.Module:
    """small_cnn after one clean epoch on n images: an undefended model is enough to compare
    two implementations of one attack, and at ε = 0.1 its robust accuracy is mid-range."""
    torch.manual_seed(0)
    d = data_lib.load("mnist5k")
    model = models.build("small_cnn", 10, 1).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for x, y in data_lib.batches(d.train_x[:n], d.train_y[:n], 64, shuffle=True,
                                 generator=torch.Generator().manual_seed(0), device=device):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def attack_table(cfg: dict, device: torch.device) -> str:
    import torchattacks

    model = trained_model(cfg["train"], device)
    d = data_lib.load("mnist5k")
    x, y = data_lib.as_float(d.test_x[:cfg["n"]], device), d.test_y[:cfg["n"]].to(device)
    eps, steps = cfg["eps"], cfg["steps"]
    alpha = 2.5 * eps / steps
    model_cl = trained_model(cfg["train"], device).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    ours, theirs = PGD(model, eps, steps=steps, alpha=alpha), torchattacks.PGD(
        model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    ours_cl = PGD(model_cl, eps, steps=steps, alpha=alpha)
    acc: dict[str, list[float]] = {"ours": [], "torchattacks": [], "ours-cl": []}

    def run(name, attack, m, xx):
        def go():
            adv = attack(xx, y)
            with torch.no_grad():
                acc[name].append((m(adv).argmax(1) == y).float().mean().item())
        return go

    t = interleave({"ours": run("ours", ours, model, x), "torchattacks": run("torchattacks", theirs, model, x),
                    "ours-cl": run("ours-cl", ours_cl, model_cl, x_cl)}, cfg["reps"], warmup=[])
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    rows = []
    for name, label in (("torchattacks", "torchattacks.PGD"), ("ours", "ours (defenses.attacks.PGD)"),
                        ("ours-cl", "ours, model and input channels-last")):
        a = [100 * v for v in acc[name]]
        rows.append([label, stats(t[name]).fmt("s"), fmt_ratio(ratio(t["torchattacks"], t[name])),
                     f"{sum(a) / len(a):.1f} ({min(a):.1f}–{max(a):.1f})"])
    return (f"PGD-{steps}, ε={eps}, α=2.5ε/{steps}, random start, on {cfg['n']} mnist5k test images; "
            f"model: small_cnn after one clean epoch on {cfg['train']} images (clean accuracy "
            f"{100 * clean:.1f} %). Robust accuracy is the mean (min–max) over the rounds, each a "
            "fresh random start:\n\n"
            + table(["attack", "time: median (min–max, rounds)", "speed-up over torchattacks",
                     "robust acc %"], rows))


def apgd_table(cfg: dict, device: torch.device) -> str:
    """Early stopping (defenses.attacks.apgd) against torchattacks' APGD, which runs every step
    on every point: same loss, schedule, budget, one restart; the model is the PGD table's."""
    import torchattacks
    from defenses.attacks.apgd import APGD

    model = trained_model(cfg["train"], device)
    d = data_lib.load("mnist5k")
    x, y = data_lib.as_float(d.test_x[:cfg["n"]], device), d.test_y[:cfg["n"]].to(device)
    steps, rows = cfg["apgd"], []
    for eps in (cfg["eps"], 0.3):  # mid-range robust accuracy, and every point broken
        attacks = {"torchattacks": torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps,
                                                     n_restarts=1, loss="ce", seed=0),
                   "ours": APGD(model, eps, steps=steps, loss="ce")}
        acc: dict[str, list[float]] = {k: [] for k in attacks}

        def go(name):
            def f():
                adv = attacks[name](x, y)
                with torch.no_grad():
                    acc[name].append((model(adv).argmax(1) == y).float().mean().item())
            return f
        t = interleave({k: go(k) for k in attacks}, cfg["reps"], warmup=[])
        for name in attacks:
            rows.append([f"ε={eps:g}", name, stats(t[name]).fmt("s"),
                         fmt_ratio(ratio(t["torchattacks"], t[name])), f"{100 * acc[name][-1]:.1f}"])
    return (f"APGD-CE-{steps} (one restart) on the same {cfg['n']} images and model, interleaved; "
            "ours drops a point from the iteration once it is misclassified:\n\n"
            + table(["ε", "attack", "time: median (min–max, rounds)", "speed-up over torchattacks",
                     "robust acc %"], rows))


def defense_steps(cfg: dict, device: torch.device) -> str:
    """Seconds of one training step (one batch through ``train_epoch``) of each defense."""
    from orchestrator.spec import parse
    from orchestrator.training import build_setup

    spec = parse({"dataset": "mnist5k", "model": "small_cnn", "epochs": 1,
                  "train_samples": cfg["batch"] * 2, "batch_size": cfg["batch"],
                  "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": cfg["k"]},
                  "defenses": ["pgd_at"]})
    names = [n for n in DEFENSES if n in registry.names()]
    skipped = [n for n in DEFENSES if n not in names]
    run_dir = tempfile.mkdtemp(prefix="bench-b2-")  # base models (teachers) trained once here
    steps, setup_s, notes = {}, {}, []
    for name in names:
        t0 = time.perf_counter()
        try:
            s = build_setup(spec, name, {}, device, run_dir)
        except Exception as e:  # another engineer's defense mid-change: say so, measure the rest
            notes.append(f"{name} skipped: {type(e).__name__}: {e}")
            continue
        setup_s[name] = time.perf_counter() - t0
        x = data_lib.as_float(s.data.train_x[:cfg["batch"]], device)
        y = s.data.train_y[:cfg["batch"]].to(device)
        steps[name] = (lambda s=s, x=x, y=y: s.defense.train_epoch([(x, y)], s.optimizer, 1))
    t = interleave(steps, cfg["step_reps"], warmup=[])
    shutil.rmtree(run_dir, ignore_errors=True)
    rows = [[name, stats(t[name]).fmt("s"),
             fmt_ratio(ratio(t[name], t["pgd_at"])) if "pgd_at" in t else "",
             f"{setup_s[name]:.1f}"] for name in t]
    notes += [f"{n} not registered: skipped" for n in skipped]
    return (f"One training step (batch {cfg['batch']}, train_steps K={cfg['k']}, ε=0.3, default "
            "hyperparameters, epoch 1) through `build_setup` + `train_epoch`, interleaved:\n\n"
            + table(["defense", "step time: median (min–max, rounds)", "× PGD-AT step",
                     "setup s (incl. its base model, once)"], rows)
            + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else ""))


def run(mode: str, device: torch.device = torch.device("cpu")) -> str:
    """``device``: where the models and images live (bench/run.py's ``--device``)."""
    cfg = SETTINGS[mode]
    started = load_line()
    body = (attack_table(cfg, device) + "\n\n" + apgd_table(cfg, device) + "\n\n"
            + defense_steps(cfg, device))
    return section(f"B2 attack speed and saliency-defense steps (mode {mode})",
                   f"nice -n 10 python bench/run.py --only b2{'' if mode == 'full' else ' --' + mode}"
                   f"{'' if device.type == 'cpu' else f' --device {device}'}",
                   body, started)
