"""Run directories: resolved config, provenance and per-item results, written atomically and resumable.

Layout of a run directory::

    config.json        the resolved settings of the command (written once; a different config is refused)
    provenance.json    git hash, package versions, command line (argv), device, dtype, seeds, start time
    results/<key>.json one file per finished unit of work (item x setting), written atomically
    artifacts/         tensors and images the report reads (embeddings, generations)

Running the same command again skips units whose result file exists; a unit killed half-way left no
file (writes go to a temporary name and are renamed), so nothing is lost or duplicated.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dori.errors import DoriError


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (a reader never sees half a file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DoriError(f"cannot write {path}: {err.strerror or err}") from err
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)  # never a temp file left behind
        raise DoriError(f"cannot write {path}: {err.strerror or err}") from err


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors artifact; a truncated or corrupt file is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DoriError(
            f"{path} is corrupt or unreadable ({type(err).__name__}: {str(err)[:160]}); delete it and run the "
            "same command again to recompute it"
        ) from err


def read_json(path: Path) -> Any:
    """Read a JSON file of a run folder; a corrupt one is an error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DoriError(f"{path} is corrupt ({type(err).__name__}: {str(err)[:160]})") from err


def git_hash() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(extra: dict | None = None) -> dict:
    import diffusers
    import transformers

    import dori

    info = {
        "dori": dori.__version__,
        "git": git_hash(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "host": platform.node(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": list(sys.argv),  # the command line that made the result
    }
    info.update(extra or {})
    return info


_KEY = re.compile(r"[^A-Za-z0-9_.+-]")
_MAX_KEY = 180  # bytes of a file name made from a key (file systems allow 255)


def safe_key(key: str) -> str:
    """A file name for a key, one-to-one: characters outside ``[A-Za-z0-9_.+-]`` become ``%XX`` (their UTF-8
    bytes), so ``a/b`` and ``a b`` get different files; a name over 180 bytes is cut and ends in ``%~`` and a
    hash of the whole key. Keys of plain characters (every built-in id) are unchanged."""
    out = _KEY.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8")), key)
    if len(out) > _MAX_KEY:
        out = out[: _MAX_KEY - 20] + "%~" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:18]
    return out


class RunDir:
    """A resumable run directory (see module docstring)."""

    def __init__(
        self, path: str | Path, config: dict[str, Any] | None = None, extra_provenance: dict | None = None
    ):
        from dori.runlock import RunLock

        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DoriError(f"cannot use run folder {self.path}: {err.strerror or err}") from err
        if not self.path.is_dir():
            raise DoriError(f"run folder {self.path} is not a folder")
        self.lock = RunLock(self.path)  # one process (or one torchrun job) writes a run folder at a time
        (self.path / "results").mkdir(exist_ok=True)
        (self.path / "artifacts").mkdir(exist_ok=True)
        cfg_file = self.path / "config.json"
        if config is not None:
            cfg = json.loads(json.dumps(config, default=str))
            if cfg_file.exists():
                old = read_json(cfg_file)
                changed = sorted(
                    k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k) and k not in _NON_BINDING
                )
                if changed:
                    what = [_CONTENT.get(k, k) for k in changed]
                    raise DoriError(
                        f"run directory {self.path} was made with other settings ({', '.join(what)}); "
                        "its results are not reused: use a new --out or delete it"
                    )
            else:
                atomic_write_text(cfg_file, json.dumps(cfg, indent=2))
        self.config = read_json(cfg_file) if cfg_file.exists() else {}
        prov_file = self.path / "provenance.json"
        if not prov_file.exists():
            atomic_write_text(prov_file, json.dumps(provenance(extra_provenance), indent=2))

    # results ---------------------------------------------------------------
    def result_path(self, key: str) -> Path:
        return self.path / "results" / f"{safe_key(key)}.json"

    def has(self, key: str) -> bool:
        """Whether a readable result exists; a corrupt one is named, set aside (``.corrupt``) and recomputed."""
        path = self.result_path(key)
        if not path.exists():
            return False
        try:
            read_json(path)
        except DoriError as err:
            path.replace(path.with_name(path.name + ".corrupt"))
            print(f"dori: warning: {err}; set aside as {path.name}.corrupt and recomputed", file=sys.stderr)
            return False
        return True

    def put(self, key: str, value: dict) -> None:
        atomic_write_text(self.result_path(key), json.dumps(value, indent=1, default=_json_default))

    def get(self, key: str) -> dict:
        path = self.result_path(key)
        if not path.exists():
            raise DoriError(f"no result {key!r} in {self.path}")
        return read_json(path)

    def results(self, prefix: str = "") -> Iterator[tuple[str, dict]]:
        for path in sorted((self.path / "results").glob(f"{safe_key(prefix)}*.json")):
            yield path.stem, read_json(path)

    # artifacts -------------------------------------------------------------
    def artifact(self, name: str) -> Path:
        return self.path / "artifacts" / safe_key(name)

    @property
    def provenance(self) -> dict:
        return read_json(self.path / "provenance.json")


_CONTENT = {  # config keys that fingerprint content (dori.fingerprint): what changed, in words
    "items_sha": "items_sha: the items' prompts or images changed",
    "mitigation_sha": "mitigation_sha: the mitigation's files changed",
    "model_sha": "model_sha: the model's weights changed",
}
_NON_BINDING = {"progress", "json", "out", "workers", "batch_size", "device"}


def _json_default(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj)}")
