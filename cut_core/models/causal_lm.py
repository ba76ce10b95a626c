"""Any Hugging Face causal LM: which modules LoRA adapts, and what a model folder must hold.

Two questions answered from a model's *config* alone (the module tree is built on the meta
device, so no weights are read and a 70B model costs nothing to inspect):

    lora_targets(model, spec)    the `target_modules` peft gets for `dsl.LoRA.target_modules`:
                                 'all-linear' (peft's own rule: every linear layer but the head),
                                 'mlp' (the paper's choice: the feed-forward layers, whatever
                                 this architecture calls them), or explicit names that must exist.
    inspect_model(...)           the problems `cut-align check` and `cut-align run` report before
                                 any work: a missing folder, config or tokenizer, no chat template
                                 for template='chat', LoRA targets that match nothing, max_length
                                 beyond the model's positions. Each is one line naming the field
                                 and the fix.

Real models shipped as GGUF files (import_gguf, smollm2_from_pypi) are in gguf.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cut_core.errors import UserError

# Path components that hold an architecture's feed-forward block (Llama/Mistral/Qwen/Phi/GPT-2/
# GPT-NeoX/Falcon/Gemma: `mlp`; others below), and leaf names of feed-forward layers that sit
# directly in a decoder layer (OPT, GPT-J style).
MLP_BLOCKS = {"mlp", "feed_forward", "ffn", "ff", "block_sparse_moe", "experts"}
MLP_LEAVES = {"fc1", "fc2", "fc_in", "fc_out", "w1", "w2", "w3", "c_fc", "gate_proj", "up_proj", "down_proj",
              "dense_h_to_4h", "dense_4h_to_h"}


def _linear_classes() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return (torch.nn.Linear, Conv1D)


def linear_module_names(model) -> list[str]:
    """Qualified names of the linear layers peft can adapt, the output head excluded."""
    head, linear = model.get_output_embeddings(), _linear_classes()
    return [name for name, module in model.named_modules() if isinstance(module, linear) and module is not head]


def mlp_targets(model) -> list[str]:
    """The feed-forward linear layers, as peft suffixes ('mlp.c_fc', not 'c_fc': GPT-2's
    attention also has a `c_proj`). Empty when the architecture has none we can recognise."""
    found = set()
    for name in linear_module_names(model):
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in MLP_BLOCKS:
            found.add(".".join(parts[-2:]))
        elif parts[-1] in MLP_LEAVES:
            found.add(parts[-1])
    return sorted(found)


def _matches(name: str, target: str) -> bool:
    """peft's rule for a string in target_modules: the whole name, or its dotted suffix."""
    return name == target or name.endswith("." + target)


def lora_targets(model, spec: str | list[str]) -> str | list[str]:
    """peft `target_modules` for a `dsl.LoRA.target_modules` value on this model; raises
    ValueError (one line: what matched nothing and what exists) when it would adapt nothing."""
    names = linear_module_names(model)
    arch = type(model).__name__
    if spec == "all-linear":
        if not names:
            raise ValueError(f"adapter.target_modules='all-linear': {arch} has no linear layers besides its head")
        return "all-linear"
    if spec == "mlp":
        targets = mlp_targets(model)
        if not targets:
            raise ValueError(f"adapter.target_modules='mlp': no feed-forward layers recognised in {arch}; "
                             f"fix: use 'all-linear' or name them (linear layers: {_leaf_summary(names)})")
        return targets
    missing = [t for t in spec if not any(_matches(n, t) for n in names)]
    if missing:
        raise ValueError(f"adapter.target_modules {missing} match no linear layer of {arch}; "
                         f"fix: use 'all-linear', 'mlp', or names among {_leaf_summary(names)}")
    return list(spec)


def _leaf_summary(names: list[str]) -> list[str]:
    return sorted({n.split(".")[-1] for n in names})


def meta_model(config) -> Any:
    """The module tree of a causal LM built from its config on the meta device: no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def max_positions(config) -> int | None:
    """The longest sequence the model's position scheme covers, when its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def inspect_model(path: str | Path, *, template: str = "alpaca", max_length: int | None = None,
                  lora_spec: str | list[str] | None = "all-linear", can_build: bool = False) -> list[str]:
    """Problems with a local model folder for this declaration, each one line with the fix.
    Reads config and tokenizer files only. `can_build`: a missing folder is fine (Model.build makes it)."""
    path = Path(path)
    if not (path / "config.json").exists():
        if can_build:
            return []
        if not path.exists():
            return [f"model.path {path} does not exist; fix: point model.path at a local Hugging Face model folder "
                    "(config.json, weights, tokenizer), or set model.build"]
        return [f"model.path {path} has no config.json; fix: point model.path at a Hugging Face model folder "
                "(save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder))"]
    from transformers import AutoConfig, AutoTokenizer

    problems = []
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 — any unreadable config is the user's to fix
        return [f"model.path {path}: config.json cannot be read ({_first_line(err)}); fix: re-save the model "
                "with a transformers version that knows its architecture"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        problems.append(f"model.path {path}: no usable tokenizer ({_first_line(err)}); fix: save the tokenizer "
                        "into the model folder (tokenizer.save_pretrained(folder))")
        tokenizer = None
    if tokenizer is not None and template == "chat" and not getattr(tokenizer, "chat_template", None):
        problems.append(f"model.template='chat' but the tokenizer in {path} has no chat template; fix: use "
                        "template='alpaca', or save a tokenizer with a chat_template")
    positions = max_positions(config)
    if max_length is not None and positions is not None and max_length > positions:
        problems.append(f"model.max_length={max_length} is beyond the {positions} positions of {path.name}; "
                        f"fix: set model.max_length <= {positions}")
    if lora_spec is not None:
        try:
            lora_targets(meta_model(config), lora_spec)
        except ValueError as err:
            problems.append(str(err))
        except Exception as err:  # noqa: BLE001 — an architecture transformers cannot build
            problems.append(f"model.path {path}: transformers cannot build {getattr(config, 'model_type', '?')} "
                            f"as a causal LM ({_first_line(err)}); fix: use a causal LM checkpoint")
    return problems


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
