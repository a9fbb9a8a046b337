"""Ray Tune + Optuna orchestration of adversarial-defense sweeps (finds defenses by registry)."""
