"""B4: search efficiency of the sweep's samplers at equal trial counts.

Each sampler (exactly as the sweep builds it for the study's trial budget,
``orchestrator.tune_adapter._samplers``; plus TPE with Optuna's own defaults) drives an
Optuna study by ask/tell over the real search space of a defense; every trial is a real
``run_trial`` (train + evaluate). ``b4``: ``pgd_at``'s 2-dimensional space (``lr``,
``clean_weight``); ``b4sat`` (bench/b4_sat.py): SAT's 6-dimensional one (``alpha``, ``eps0``,
``teacher``, ``method``, ``variant``, ``lr``), where a configuration's worth depends on more than
a learning rate, so a model-based sampler has something to learn. The score is the hypervolume
(``orchestrator.aggregate.hypervolume``, reference at the origin) of (clean_acc, robust_acc)
over the study's trials; several sampler seeds, same data and initialization.

Two references: the origin (the aggregator's default), and the nadir of every trial of the run
(the worst clean and the worst robust accuracy any sampler's trial reached). Accuracies are
bounded by 1, so most of the volume above the origin is dominated by any decent trial and
ratios there stay near 1; above the nadir only the region the samplers actually compete
over counts."""
from __future__ import annotations

import logging
import statistics
import tempfile

import pandas as pd

from bench.common import load_line, section, table

SETTINGS = {
    "tiny": dict(trials=2, seeds=(0,), train=100, epochs=1, k=1, eval=50),
    "quick": dict(trials=4, seeds=(0, 1, 2), train=500, epochs=1, k=1, eval=100),
    "full": dict(trials=20, seeds=(0, 1, 2), train=1000, epochs=2, k=3, eval=500),
}
SAMPLERS = ("random", "tpe", "nsga2", "tpe-optuna-defaults")
DEFENSE = "pgd_at"


def study_rows(sampler_name: str, seed: int, cfg: dict, run_dir: str,
               defense: str = DEFENSE) -> pd.DataFrame:
    import optuna

    from orchestrator.trial import run_trial
    from orchestrator.tune_adapter import _samplers

    spec, dists = bench_space(cfg, defense)
    if sampler_name == "tpe-optuna-defaults":  # what the sweep used before sizing to the budget
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    else:
        sampler = _samplers()[sampler_name](seed, cfg["trials"])
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    rows = []
    for _ in range(cfg["trials"]):
        trial = study.ask(dists)
        rec = run_trial({"defense": defense, "hp": dict(trial.params), "spec": spec, "run_dir": run_dir})
        study.tell(trial, [rec.clean_acc, rec.robust_acc])
        rows.append({"status": rec.status, "clean_acc": rec.clean_acc, "robust_acc": rec.robust_acc})
    return pd.DataFrame(rows)


def bench_space(cfg: dict, defense: str):
    """(the trials' spec, the defense's Optuna distributions)."""
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.spec import build_space, parse

    spec = parse({"dataset": "mnist5k", "model": "small_cnn", "epochs": cfg["epochs"], "train_samples": cfg["train"],
                  "eval_samples": cfg["eval"], "batch_size": 100,
                  "threat_model": {"eps": 0.3, "attacks": ["fgsm"], "train_steps": cfg["k"],
                                   "masking_samples": 0},
                  "defenses": [defense]})
    return spec, OptunaSearch.convert_search_space(build_space(spec, defense))


def run(mode: str, defense: str = DEFENSE, settings: dict | None = None,
        samplers: tuple[str, ...] = SAMPLERS, key: str = "b4") -> str:
    import optuna

    from orchestrator.aggregate import hypervolume
    from orchestrator.tune_adapter import population_size, startup_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("orchestrator").setLevel(logging.WARNING)
    cfg = (settings or SETTINGS)[mode]
    started = load_line()
    studies: dict[str, list[pd.DataFrame]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-b4-") as run_dir:  # base models shared by all
        for seed in cfg["seeds"]:  # samplers in turn per seed: load drift hits all alike
            for name in samplers:
                studies.setdefault(name, []).append(study_rows(name, seed, cfg, run_dir, defense))
    done = pd.concat([df for dfs in studies.values() for df in dfs])
    done = done[done["status"] == "completed"]
    nadir = (float(done["clean_acc"].min()), float(done["robust_acc"].min()))
    rows, hv_by_ref = [], {}
    for ref_name, ref in (("origin", None), (f"nadir ({nadir[0]:.3f}, {nadir[1]:.3f})", nadir)):
        hv = hv_by_ref[ref_name] = {name: [hypervolume(df, reference=ref) for df in dfs]
                                    for name, dfs in studies.items()}
        for name, values in hv.items():
            ratios = [v / r if r > 0 else float("nan") for v, r in zip(values, hv["random"])]
            rows.append([ref_name, name, ", ".join(f"{v:.4f}" for v in values), f"{statistics.median(values):.4f}",
                         f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"])
    flat = [v for values in hv_by_ref["origin"].values() for v in values]
    degenerate = ("\n\n**Every study reached the same hypervolume: at these settings the objective "
                  "does not depend on the hyperparameters (the models barely train), so this run "
                  "says nothing about the samplers.**" if max(flat) - min(flat) < 1e-9 else "")
    dims = sorted(bench_space(cfg, defense)[1])
    body = (f"`{defense}` search space ({len(dims)}-dimensional: {', '.join(dims)}), {cfg['trials']} trials per study, sampler seeds {list(cfg['seeds'])}; "
            f"each trial: {cfg['epochs']} epoch(s) on {cfg['train']} mnist5k images, PGD-{cfg['k']} training, "
            f"evaluation on {cfg['eval']} test images with FGSM (ε=0.3). Target: default sampler "
            "≥ 1.15× random.\n\n"
            + table(["reference", "sampler", "hypervolume per seed", "median", "÷ random (median, min–max)"], rows)
            + f"\n\nAs the sweep builds them for {cfg['trials']} trials: TPE starts with "
            f"{startup_trials(cfg['trials'])} random trials, NSGA-II's generations hold "
            f"{population_size(cfg['trials'])}."
            + (" `tpe-optuna-defaults` is TPE with Optuna's own start (10 random trials)."
               if "tpe-optuna-defaults" in samplers else "") + degenerate)
    return section(f"{key.upper()} search efficiency, {defense} (mode {mode})",
                   f"nice -n 10 python bench/run.py --only {key}{'' if mode == 'full' else ' --' + mode}",
                   body, started)
