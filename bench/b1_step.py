"""B1: one PGD-K adversarial-training step over one clean step, next to its floor.

Floor = clean step + K × attack pass, where an attack pass is one forward and one backward to
the input with the parameters frozen (eval mode): what PGD-K cannot avoid. Measured on
mnist5k / small_cnn, batch 128, for the default memory format and channels-last, through the
real training code (``PGDAT.train_epoch`` on one batch), plus the straightforward version
(torchattacks PGD inside a plain loop) as the baseline of target (b)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from bench.common import fmt_ratio, interleave, load_line, ratio, section, stats, table
from defenses.core import data as data_lib
from defenses.core import models
from defenses.attacks.base import frozen_eval
from defenses.attacks.pgd import ce_loss, pgd
from defenses.core.base import ThreatModel
from defenses.pgd_at import PGDAT, PGDATParams

log = logging.getLogger(__name__)
EPS = 0.3
SETTINGS = {  # batch, K values, rounds, images for the accuracy check (0: skipped)
    "tiny": dict(batch=16, ks=(2,), reps=1, acc_train=0, acc_epochs=0),
    "quick": dict(batch=128, ks=(7, 10), reps=3, acc_train=0, acc_epochs=0),
    "full": dict(batch=128, ks=(7, 10), reps=7, acc_train=4000, acc_epochs=3),
}


class Rig:
    """One model, optimizer and batch in one memory format; each method is one timed unit."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, channels_last: bool, seed: int = 0):
        torch.manual_seed(seed)
        model = models.build("small_cnn", 10, 1).to(x.device)
        model(x[:2])  # materialize the lazy layer before the format change and the optimizer
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(memory_format=fmt)
        self.x, self.y = x.contiguous(memory_format=fmt), y
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def clean_step(self) -> None:
        self.model.train()
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def attack_pass(self) -> None:
        with frozen_eval(self.model):
            delta = torch.zeros_like(self.x).requires_grad_(True)
            torch.autograd.grad(ce_loss(self.model(self.x + delta), self.y), delta)

    def pgd_step(self, k: int, precision: str = "fp32") -> None:
        defense = PGDAT(self.model, PGDATParams(), ThreatModel(eps=EPS, train_steps=k, train_precision=precision))
        defense.train_epoch([(self.x, self.y)], self.opt, 1)

    def torchattacks_step(self, k: int) -> None:
        """The straightforward loop: torchattacks PGD, then CE on its output."""
        import torchattacks

        atk = torchattacks.PGD(self.model, eps=EPS, alpha=2.5 * EPS / k, steps=k, random_start=True)
        self.model.train()
        adv = atk(self.x, self.y)
        loss = F.cross_entropy(self.model(adv), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def batch(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    d = data_lib.load("mnist5k")
    return data_lib.as_float(d.train_x[:n], device), d.train_y[:n].to(device)


def step_table(cfg: dict, device: torch.device) -> str:
    x, y = batch(cfg["batch"], device)
    rigs = {"default": Rig(x, y, False), "channels-last": Rig(x, y, True)}
    k_ref = cfg["ks"][0]
    variants = {}
    for fmt, rig in rigs.items():
        variants[f"clean/{fmt}"] = rig.clean_step
        variants[f"pass/{fmt}"] = rig.attack_pass
        for k in cfg["ks"]:
            variants[f"pgd{k}/{fmt}"] = (lambda r=rig, k=k: r.pgd_step(k))
    variants[f"pgd{k_ref}-bf16/channels-last"] = lambda: rigs["channels-last"].pgd_step(k_ref, "bf16")
    variants[f"ta{k_ref}/default"] = lambda: rigs["default"].torchattacks_step(k_ref)
    warm = [n for n in variants if n.startswith(("clean", "pass"))]
    t = interleave(variants, cfg["reps"], warmup=warm)
    rows = []
    for fmt in rigs:
        clean, pas = stats(t[f"clean/{fmt}"]), stats(t[f"pass/{fmt}"])
        rows.append([fmt, "clean step", clean.fmt("ms", 1e3), "1.00×", "", ""])
        rows.append([fmt, "attack pass", pas.fmt("ms", 1e3), fmt_ratio(ratio(t[f"pass/{fmt}"], t[f"clean/{fmt}"])), "", ""])
        for k in cfg["ks"]:
            floor = [c + k * p for c, p in zip(t[f"clean/{fmt}"], t[f"pass/{fmt}"])]
            step = t[f"pgd{k}/{fmt}"]
            vs_default = fmt_ratio(ratio(t[f"pgd{k}/default"], step)) if fmt != "default" else ""
            rows.append([fmt, f"PGD-{k} step (ours)", stats(step).fmt("ms", 1e3),
                         fmt_ratio(ratio(step, t[f"clean/{fmt}"])),
                         f"{fmt_ratio(ratio(floor, t[f'clean/{fmt}']))}; step/floor "
                         f"{fmt_ratio(ratio(step, floor))}", vs_default])
    bf16 = t[f"pgd{k_ref}-bf16/channels-last"]
    rows.append(["channels-last", f"PGD-{k_ref} step, attack in bf16 (`train_precision: bf16`)",
                 stats(bf16).fmt("ms", 1e3), fmt_ratio(ratio(bf16, t["clean/channels-last"])), "",
                 f"{fmt_ratio(ratio(t[f'pgd{k_ref}/default'], bf16))} over default-format fp32"])
    ta = t[f"ta{k_ref}/default"]
    rows.append(["default", f"PGD-{k_ref} step, torchattacks loop", stats(ta).fmt("ms", 1e3),
                 fmt_ratio(ratio(ta, t["clean/default"])), "",
                 f"ours channels-last is {fmt_ratio(ratio(ta, t[f'pgd{k_ref}/channels-last']))} faster; "
                 f"with the bf16 attack {fmt_ratio(ratio(ta, bf16))}"])
    head = ["memory format", "what", "time: median (min–max, rounds)", "× clean step",
            "floor (× clean); step / floor", "speed-up"]
    return table(head, rows)


def profile_table(cfg: dict, device: torch.device, top: int = 10) -> str:
    """Where a PGD-K step's CPU time goes (default format), by self time per op."""
    from torch.profiler import ProfilerActivity, profile

    x, y = batch(cfg["batch"], device)
    rig = Rig(x, y, False)
    k = cfg["ks"][0]
    rig.pgd_step(k)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        rig.pgd_step(k)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    rows = [[e.key, e.count, f"{e.self_cpu_time_total / 1e3:.1f}",
             f"{100 * e.self_cpu_time_total / total:.1f} %"] for e in events[:top]]
    return (f"Profile of one PGD-{k} step (default format, torch.profiler, self CPU time):\n\n"
            + table(["op", "calls", "self ms", "share"], rows))


def accuracy_table(cfg: dict, device: torch.device) -> str:
    """Target (b) at equal robust accuracy: the same epochs of the straightforward loop and of
    ours (channels-last; fp32 and bf16 attack) from the same initialization and batches, then
    the same PGD-20 evaluation."""
    import time

    d = data_lib.load("mnist5k")
    n, b, k, epochs = cfg["acc_train"], cfg["batch"], cfg["ks"][0], cfg["acc_epochs"]
    xs, ys = data_lib.as_float(d.train_x[:n], device), d.train_y[:n].to(device)
    xt, yt = data_lib.as_float(d.test_x[:500], device), d.test_y[:500].to(device)
    rows, seconds_of = [], []
    for name, channels_last, step in (("torchattacks loop", False, lambda r: r.torchattacks_step(k)),
                                      ("ours, channels-last", True, lambda r: r.pgd_step(k)),
                                      ("ours, channels-last, bf16 attack", True, lambda r: r.pgd_step(k, "bf16"))):
        rig = Rig(xs[:b], ys[:b], channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        torch.manual_seed(1)
        t0 = time.perf_counter()
        for _ in range(epochs):
            for i in range(0, n, b):
                rig.x, rig.y = xs[i:i + b].contiguous(memory_format=fmt), ys[i:i + b]
                step(rig)
        seconds = time.perf_counter() - t0
        seconds_of.append(seconds)
        rig.model.eval()
        with torch.no_grad():
            clean = (rig.model(xt).argmax(1) == yt).float().mean().item()
        adv = pgd(rig.model, xt, yt, EPS, 2.5 * EPS / 20, 20, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            robust = (rig.model(adv).argmax(1) == yt).float().mean().item()
        rows.append([name, f"{seconds:.1f}", f"{100 * clean:.1f}", f"{100 * robust:.1f}"])
    return (f"{epochs} PGD-{k} training epoch(s) ({n} images, batch {b}), evaluated on 500 test "
            f"images with our PGD-20 (ε={EPS}); trainings run one after the other, not interleaved:\n\n"
            + table(["training", "training s", "clean %", "PGD-20 robust %"], rows)
            + f"\n\nSpeed-up over the straightforward loop: ours channels-last "
            f"{seconds_of[0] / seconds_of[1]:.2f}×, with the bf16 attack {seconds_of[0] / seconds_of[2]:.2f}×.")


def run(mode: str, device: torch.device = torch.device("cpu")) -> str:
    """``device``: where the models and batches live (bench/run.py's ``--device``)."""
    cfg = SETTINGS[mode]
    started = load_line()
    parts = [step_table(cfg, device), profile_table(cfg, device)]
    if cfg["acc_train"]:
        parts.append(accuracy_table(cfg, device))
    return section(f"B1 adversarial-training step (small_cnn, batch {cfg['batch']}, mode {mode})",
                   f"nice -n 10 python bench/run.py --only b1{'' if mode == 'full' else ' --' + mode}"
                   f"{'' if device.type == 'cpu' else f' --device {device}'}",
                   "\n\n".join(parts), started)
