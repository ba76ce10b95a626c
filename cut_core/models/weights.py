"""The identity of a model's weights: one sha256 over its config and safetensors files.

A registered model version carries this digest as a tag (tasks/tracking.py). Whoever starts
from that version (the next iteration, a recurring round, a run resumed on another machine)
recomputes it over the folder it is about to load and refuses a folder whose weights differ.

What is hashed: `config.json` and every `*.safetensors` file of the folder, in name order,
each as its name, its size and its bytes. Tokenizer and generation files are not part of it
(they do not change in training); a sharded model's index is covered by its shards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 22  # 4 MiB reads: a multi-GB model is hashed without holding it in memory


def digested_files(folder: str | Path) -> list[Path]:
    """The files `weights_digest` covers, in the order it reads them."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    files = [p for p in folder.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix == ".safetensors")]
    if len(files) == 1:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights (save the model with save_pretrained, "
                                "which writes safetensors)")
    return sorted(files, key=lambda p: p.name)


def weights_digest(folder: str | Path) -> str:
    """sha256 (hex) of a model folder's config.json and *.safetensors files."""
    h = hashlib.sha256()
    for path in digested_files(folder):
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def adapter_digest(folder: str | Path) -> str:
    """sha256 (hex) of a PEFT adapter folder: its adapter_config.json, *.safetensors files and
    (when present) cut_align_merged_config.json, each as its name, size and bytes (tokenizer
    files are not part of it)."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    files = sorted([p for p in folder.iterdir() if p.is_file() and (p.name in (ADAPTER_CONFIG, "cut_align_merged_config.json") or p.suffix == ".safetensors")],
                   key=lambda p: p.name)
    if len(files) == 1:
        raise FileNotFoundError(f"{folder} holds no *.safetensors adapter weights")
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()
