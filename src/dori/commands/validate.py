"""The one validation layer for the numbers (and a few strings) given on the command line.

Every parsed option passes through :func:`validate_args` before a command runs (``dori.cli.main``), keyed
by the option's name, whichever command defines it: counts must be at least 1 (or 0 where 0 has a stated
meaning), every float must be finite, rates positive, seeds in range, the device a known kind, and a
name-like option never empty. A bad value is a :class:`DoriError` naming the option, before any work; no
command reads a count as ``x or default`` any more, so ``0`` never silently means "default".
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from dori.errors import DoriError

MAX_SEED = 2**53 - 1  # seeds are offset per item and generation; kept exact in JSON and under 2**64

# options that count something: at least 1 (None = the default / "all")
AT_LEAST_ONE = {
    "limit", "steps", "sample_steps", "sampling_steps", "n_gens", "n_gen", "batch_size", "dori_batch",
    "uda_timesteps", "uda_iterations", "iterations", "epochs", "steps_per_embedding", "items_per_step",
    "embeddings_per_item", "n_utility", "noise_draws", "lora_rank", "stop_generations", "surrogates_per_item",
    "surrogate_rounds", "n_anchors", "anchor_images", "workers", "k", "gens", "n_seeds", "chunk", "iterative",
    "timesteps", "max_items", "calibration_limit", "duplicates",
}  # fmt: skip
# where 0 has a stated meaning: (command, option) -> lowest value
LOWEST = {
    ("demo", "limit"): 0,  # --limit 0: all items
    ("demo", "n_utility"): 0,
    ("finetune", "dori_steps"): 0,  # 0: the initial embedding itself
    ("finetune", "utility_batch"): 0,  # 0: as many as adversarial samples
}
MAX_SAMPLE_STEPS = 1000  # DDIM steps cannot exceed the training schedule's timesteps (1000 for SD)
POSITIVE = {
    "lr",
    "dori_lr",
    "norm_ball",
    "memory_budget_gib",
    "tau",
    "theta_start",
    "theta_step",
    "theta_min",
}
NON_NEGATIVE = {
    "guidance", "weight_decay", "utility_weight", "pause_after", "sparsity", "persistent", "adv_min_timestep",
}  # fmt: skip
FRACTION = {"stop_mr", "sparsity", "uncond_share"}
NOT_EMPTY = {
    "model", "set", "out", "json", "mitigation", "surrogate_mitigation", "surrogate_model", "surrogates",
    "images", "utility_set", "reference_images", "sscd", "clip", "inception", "anchors",
}  # fmt: skip
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def validate_args(args: argparse.Namespace) -> None:
    """Check every option of a parsed command line (see module docstring).

    Raises:
        DoriError: the first bad value, naming its option and what it must be.
    """
    command = getattr(args, "command", None)
    for dest, value in sorted(vars(args).items()):
        if value is None or callable(value) or isinstance(value, bool):
            continue
        flag = _flag(dest)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise DoriError(f"{flag} must be a finite number, got {value}")
            if dest in POSITIVE and value <= 0:
                raise DoriError(f"{flag} must be positive, got {value}")
            if dest in NON_NEGATIVE and value < 0:
                raise DoriError(f"{flag} must be >= 0, got {value}")
            if dest in FRACTION and not 0 <= value <= 1:
                raise DoriError(f"{flag} must be between 0 and 1, got {value}")
        elif isinstance(value, int):
            if dest == "seed":
                if not 0 <= value <= MAX_SEED:
                    raise DoriError(f"--seed must be in [0, 2**53 - 1], got {value}")
                continue
            low = LOWEST.get((command, dest), 1 if dest in AT_LEAST_ONE else 0)
            if value < low:
                raise DoriError(f"{flag} must be at least {low}, got {value}")
            if dest in ("sample_steps", "sampling_steps") and value > MAX_SAMPLE_STEPS:
                raise DoriError(
                    f"{flag} must be at most {MAX_SAMPLE_STEPS} (the training timesteps), got {value}"
                )
        elif isinstance(value, str):
            if dest in NOT_EMPTY and not value.strip():
                raise DoriError(f"{flag} is empty; leave the option out for its default")
            out = Path(value).expanduser()
            if dest == "out" and value.strip() and out.exists() and not out.is_dir():
                raise DoriError(f"--out {value} is a file, not a folder")
            if dest == "json" and value.strip():
                check_writable_file(value, "--json")
            if dest == "scaling_norm" and value != "auto":
                try:
                    number = float(value)
                except ValueError:
                    number = math.nan
                if not math.isfinite(number) or number <= 0:
                    raise DoriError(f"--scaling-norm must be a positive number or auto, got {value!r}")
            if dest == "device" and not _DEVICE.match(value):
                raise DoriError(
                    f"--device {value!r} is not a device dori runs on: use cpu, cuda, cuda:N or mps"
                )


def check_writable_file(path: str, flag: str) -> None:
    """Fail now, not after hours of work, when ``path`` cannot be written: it is a folder, or its folder
    cannot be made or written to (a probe file is created there and removed).

    Raises:
        DoriError: naming the option and the reason.
    """
    import os

    target = Path(path).expanduser()
    if target.is_dir():
        raise DoriError(f"{flag} {path} is a folder; give a file name")
    probe = target.parent / f".dori-probe-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DoriError(f"{flag} {path} cannot be written ({err.strerror or err})") from err
