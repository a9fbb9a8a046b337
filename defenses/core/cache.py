"""One content-keyed, locked, atomic cache for what trials build once and share: base models
(``orchestrator.training``), SAT's saliency maps, the saliency detectors' adversarial sets and
detector networks. Concurrent trials on one machine (or on nodes sharing a folder) wait on a
file lock instead of building twice, and a reader never sees half a file: everything is
written to a temporary sibling and renamed onto its name (``atomic_write``, the one writer of
result files too). Plain Python at import: the aggregator writes its CSVs through
``atomic_write`` on machines without torch, so torch is imported where tensors are handled."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``:
    in one folder ``os.replace`` is atomic, so a reader sees the old file or the new one,
    never half of one; on any failure the temporary file is removed and ``path`` is left as
    it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def key_digest(**parts: Any) -> str:
    """12 hex of the JSON of ``parts``: a cache key from what the cached thing depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tensor_digest(*tensors: torch.Tensor) -> str:
    """16 hex of the tensors' shapes, dtypes and bytes (two tensors with the same bytes but
    another shape or dtype are other data)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(_bytes(t))
    return h.hexdigest()[:16]


def _bytes(t: torch.Tensor) -> bytes:
    import torch

    # through uint8 rather than numpy: bfloat16 has no numpy dtype
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_digest(model: nn.Module) -> str:
    """16 hex of a model's parameters and buffers (name, then bytes): which classifier a
    detector, a masking model or a cached adversarial set belongs to. Detector checkpoints
    store it, so it must stay the same function of the weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(_bytes(t))
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (a checkpoint enters a key by its content, not its path)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_once(path: Path, build: Callable[[Path], None],
               ready: Callable[[Path], bool] = Path.exists) -> Path:
    """``path`` (a file or a folder), built by ``build(tmp)`` unless ``ready(path)``; ``build``
    writes ``tmp``, a sibling that does not exist yet, and it is renamed onto ``path``. Under
    an exclusive lock on ``path`` + ".lock": whoever waited finds it ready and builds nothing.
    Something at ``path`` that is not ready (an older format, a half-built folder of a crashed
    writer before this rule) is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if ready(path):
        return path
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready(path):  # built by another process while this one waited
            return path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        _remove(tmp)
        try:
            build(tmp)
            if path.is_dir():  # os.replace cannot put a folder onto a non-empty one
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            _remove(tmp)
    return path


def cached_state(path: Path, build: Callable[[], dict[str, Any]], device: torch.device,
                 valid: Callable[[dict[str, Any]], bool] = lambda state: True) -> dict[str, Any]:
    """The ``torch.save``d dict at ``path`` (on ``device``), or ``build()``'s, written there
    once (``build_once``); a stored dict that is not ``valid`` is built again."""
    import torch

    found: dict[str, Any] = {}  # the valid state a readiness check loaded: not loaded again

    def ready(p: Path) -> bool:
        if p.is_file():
            state = torch.load(p, map_location=device, weights_only=True)
            if valid(state):
                found.update(state)
                return True
        return False

    def write(tmp: Path) -> None:
        found.update(build())
        torch.save({k: v.cpu() if torch.is_tensor(v) else v for k, v in found.items()}, tmp)

    build_once(path, write, ready=ready)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in found.items()}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
