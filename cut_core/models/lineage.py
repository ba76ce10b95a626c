"""What a model folder is made of: the one record of "this folder = base + adapter".

A LoRA iteration's merged folder equals a base model with one PEFT adapter applied. Serving
engines need that decomposition (vLLM serves the base once and loads each version's adapter),
and the registry stores a LoRA version as its adapter plus the reference of its base. Whoever
writes a merged folder of a LoRA run writes `cut_align_lineage.json` into it; whoever needs the
decomposition reads it here. A folder without the file is a full model of its own (a declared
base, or full fine-tuning).

Fields (all paths absolute):
  base_model   the folder the adapter applies to (loadable by AutoModelForCausalLM)
  base_digest  cut_core.models.weights.weights_digest(base_model) when the adapter was trained
  adapter      the PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
  base_ref     optional: the registry reference of the base (e.g. "models:/NAME/3"), else None
  adapter_digest  optional: adapter_digest(adapter) when the folder was written
  merged_digest   optional: weights_digest of the merged folder itself when it was written

Every LoRA version is "declared base + ONE adapter": the next iteration (or a round starting
from a champion) continues this adapter on the same base (train_cli's `init_adapter`), so a
lineage never chains; `base_model` is a full model (the declared base, or a full-weight version).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

FILE = "cut_align_lineage.json"
# In a LoRA run's adapter folder: the merged folder's config.json as training wrote it, so a merge
# rebuilt from base + adapter is byte-identical (covered by cut_core.models.weights.adapter_digest).
MERGED_CONFIG = "cut_align_merged_config.json"


@dataclass(frozen=True)
class Lineage:
    base_model: str
    base_digest: str
    adapter: str
    base_ref: str | None = None
    adapter_digest: str | None = None
    merged_digest: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def read_lineage(model_dir: str | Path) -> Lineage | None:
    """The lineage recorded in a model folder; None for a full model (no record)."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Lineage(base_model=data["base_model"], base_digest=data["base_digest"], adapter=data["adapter"],
                   base_ref=data.get("base_ref"), adapter_digest=data.get("adapter_digest"),
                   merged_digest=data.get("merged_digest"))


def write_lineage(model_dir: str | Path, lineage: Lineage) -> None:
    """Record `model_dir = lineage.base_model + lineage.adapter` (atomically: whole or absent)."""
    from cut_core.files import write_text_atomic

    write_text_atomic(Path(model_dir) / FILE, lineage.to_json() + "\n")


def merge_adapter(base_model: str | Path, adapter: str | Path, out: str | Path, *, dtype: str | None = None,
                  base_ref: str | None = None) -> Lineage:
    """Write base + adapter, merged, into the empty folder `out` (weights, config, the adapter
    folder's tokenizer, and its lineage); returns the lineage written. `dtype` (e.g. "float32",
    the dtype the training run's merged folder had) is the dtype the base is loaded and saved in."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cut_core.models.weights import adapter_digest, weights_digest

    torch_dtype = getattr(torch, dtype) if dtype else "auto"
    base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch_dtype, use_safetensors=True)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))
    if (Path(adapter) / MERGED_CONFIG).is_file():
        import shutil

        shutil.copyfile(Path(adapter) / MERGED_CONFIG, Path(out) / "config.json")
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(out))
    lineage = Lineage(base_model=str(Path(base_model).resolve()), base_digest=weights_digest(base_model),
                      adapter=str(Path(adapter).resolve()), base_ref=base_ref, adapter_digest=adapter_digest(adapter),
                      merged_digest=weights_digest(out))
    write_lineage(out, lineage)
    return lineage


def ensure_lineage(model_dir: str | Path, base_model: str | Path, adapter: str | Path) -> Lineage:
    """The folder's lineage; written (base_model + adapter, base digested now) when it has none."""
    found = read_lineage(model_dir)
    if found is not None:
        return found
    from cut_core.models.weights import weights_digest

    record = Lineage(base_model=str(Path(base_model).resolve()), base_digest=weights_digest(base_model),
                     adapter=str(Path(adapter).resolve()))
    write_lineage(model_dir, record)
    return record
