"""Ray cluster-launcher configs (clusters/*.yaml): validation with one clear line, and what an
autoscaling cluster can grow to.

``python -m orchestrator.cluster check clusters/gpu.yaml`` validates a config against Ray's own
schema (the checks ``ray up`` makes, without touching a cloud): exit 0, or one line and exit 2."""
from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from orchestrator.cli import BadInput, complain

class ClusterConfigError(BadInput, ValueError):
    """What is wrong with a cluster config, in one line."""


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """The config of ``path`` as ``ray up`` prepares it (defaults of its provider filled in),
    validated against Ray's cluster schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    p = Path(path)
    if not p.is_file():
        raise ClusterConfigError(f"cluster config {p} not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ClusterConfigError(f"cluster config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ClusterConfigError(f"cluster config {p} must be a mapping of keys")
    for key in ("cluster_name", "provider"):
        if key not in raw:
            raise ClusterConfigError(f"cluster config {p}: missing required field {key!r}")
    if not isinstance(raw["provider"], dict) or "type" not in raw["provider"]:
        raise ClusterConfigError(f"cluster config {p}: missing required field 'provider.type'")
    quiet = logging.getLogger("ray.autoscaler")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its INFO lines about filled-in defaults are not for users
    try:
        config = prepare_config(copy.deepcopy(raw))
        validate_config(config)
    except Exception as e:  # jsonschema, KeyError, click aborts: all become one line
        raise ClusterConfigError(f"cluster config {p}: {_reason(e)}") from None
    finally:
        quiet.setLevel(level)
    return config


def _reason(e: Exception) -> str:
    if type(e).__name__ == "ValidationError" and hasattr(e, "message"):
        where = ".".join(str(part) for part in getattr(e, "absolute_path", [])) or "top level"
        return f"{where}: {e.message.splitlines()[0]}"
    if isinstance(e, KeyError):
        return f"missing required field {e.args[0]!r}"
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def autoscaling_capacity(bootstrap: str | Path) -> dict[str, float]:
    """CPUs/GPUs an autoscaling cluster can reach, from the config the launcher leaves on its
    head (``~/ray_bootstrap_config.yaml``): head + every worker type at its max_workers (within
    the global max_workers). Node types that do not state their resources count for nothing
    (Ray detects those at start). Empty when there is no such file."""
    path = Path(bootstrap)
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    budget = int(config.get("max_workers", 0) or 0)
    cpus = gpus = node_cpus = node_gpus = 0.0
    for name, node_type in types.items():
        res = node_type.get("resources") or {}
        count = 1 if name == head else min(int(node_type.get("max_workers", budget) or 0), budget)
        if name != head:
            budget -= count
        cpus += float(res.get("CPU", 0)) * count
        gpus += float(res.get("GPU", 0)) * count
        if count:
            node_cpus = max(node_cpus, float(res.get("CPU", 0)))
            node_gpus = max(node_gpus, float(res.get("GPU", 0)))
    return {"cpus": cpus, "gpus": gpus, "node_cpus": node_cpus, "node_gpus": node_gpus}


def can_add_workers(bootstrap: str | Path) -> bool:
    """Whether the launcher config on a cluster's head (``~/ray_bootstrap_config.yaml``) lets
    its autoscaler add worker nodes."""
    path = Path(bootstrap)
    try:
        config = yaml.safe_load(path.read_text()) or {} if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return False
    return int(config.get("max_workers", 0) or 0) > 0


def nodes_not_seeing(ray, nodes: list[dict], path: str) -> list[str]:
    """The addresses of the ``nodes`` (``ray.nodes()`` entries) on which ``path`` does not
    exist: a zero-CPU task pinned to each node looks."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    sees = ray.remote(num_cpus=0)(_exists)
    refs = [(n["NodeManagerAddress"], sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(path)) for n in nodes]
    return [address for address, ref in refs if not ray.get(ref, timeout=120)]


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate cluster YAML files against Ray's schema")
    check.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    for f in args.files:
        try:
            config = load_cluster_config(f)
        except ClusterConfigError as e:
            return complain("cluster", str(e))
        print(f"ok: {f} ({config['provider']['type']} provider, node types: "
              f"{', '.join(config['available_node_types'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
