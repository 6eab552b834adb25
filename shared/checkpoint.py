"""Atomic checkpoints: model weights in the libraries' own format plus the full trainer state.

Layout of `runs/<name>/checkpoints/step_000040/`:

    model/                 save_pretrained output (safetensors; a peft adapter when training LoRA)
    trainer_state.pt       optimizer, scheduler, sampler, RNG states, step, summary-so-far

A checkpoint is written under a temporary name and renamed into place, so a crash leaves either
the previous checkpoint set or the new one, never a half-written directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

CKPT_PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(ckpt_dir: Path, step: int, save_model, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write step `step` atomically; `save_model(path)` writes the model in HF format."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{CKPT_PREFIX}{step:06d}"
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(tmp / "model")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    _fsync_tree(tmp)
    if final.exists():  # re-running the same step: swap, then drop the old copy
        old = ckpt_dir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)


def load_hf_weights(model: torch.nn.Module, path: Path) -> None:
    """Load weights written by `save_pretrained` into an existing model (full weights or a peft adapter).
    A module of several models that writes its own layout loads itself (`load_pretrained`: CORY's agent pair)."""
    path = Path(path)
    if hasattr(model, "load_pretrained"):
        model.load_pretrained(path)
        return
    if (path / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"{path}: adapter has keys the model lacks: {unexpected[:3]}")
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no safetensors weights found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not set(state) <= set(target.state_dict()) and hasattr(type(target), "from_pretrained"):
        # the checkpoint uses the library's serialised key names (e.g. Qwen2-VL saves `visual.*` for the
        # module `model.visual.*`): let transformers map them, then copy the weights over
        dtype = next(target.parameters()).dtype
        state = type(target).from_pretrained(path, dtype=dtype).state_dict()
    missing, unexpected = target.load_state_dict(state, strict=False)
    tied = set(getattr(target, "_tied_weights_keys", None) or [])  # a list, or a dict keyed by name
    really_missing = [k for k in missing if k not in tied]
    if really_missing or unexpected:
        raise RuntimeError(f"{path}: weights do not match the model (missing {really_missing[:3]}, unexpected {unexpected[:3]})")
