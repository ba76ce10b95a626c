"""Online iterations and evaluation: Generation (engine and sampling in one place), Online, Evaluation; the
mapping of the old generation fields of Online/Evaluation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from cut_core.dsl.base import Section
from cut_core.dsl.judges import check_base_url, endpoint_key_env

# ---------------------------------------------------------------- online iterations, evaluation

ENGINES = ("transformers", "openai", "vllm")
# Fields only one engine reads; set for another engine they are refused (a typo'd engine would
# otherwise silently generate in-process).
_ENGINE_FIELDS = {"openai": ("base_url", "model", "api_key_env", "api_key_secret", "concurrency", "timeout_s",
                             "prompt_format", "max_retries"),
                  "vllm": ("python", "max_model_len", "dtype")}


class Generation(Section):
    """Who generates online responses and evaluation answers, and how they are sampled (the one
    place for temperature, top_p, n, seed, max_new_tokens). See docs/architecture.md
    "Generation engines" for how a server is made to answer with the model being aligned."""
    engine: Literal["transformers", "openai", "vllm"] = Field(
        default="transformers",
        description="'transformers' (in-process model.generate), 'openai' (an OpenAI-compatible server's "
        "/v1/completions: vllm serve, SGLang, transformers serve) or 'vllm' (vLLM's offline LLM engine in a "
        "subprocess run by `python`)")
    temperature: float = Field(default=0.0, ge=0, description="sampling temperature; 0 = greedy (the paper)")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling mass (with temperature > 0)")
    n: int = Field(default=1, ge=1, le=64, description="responses per prompt (rejection sampling takes n > 1)")
    seed: int | None = Field(default=None, description="sampling seed: the same seed gives the same samples "
                             "(per engine); None = unseeded")
    max_new_tokens: int = Field(default=256, ge=1, description="generation length cap in new tokens")
    batch_size: int = Field(default=32, ge=1, description="prompts per in-process batch (generation and scoring)")
    base_url: str | None = Field(
        default=None, description="engine='openai': the server's OpenAI-compatible endpoint, e.g. "
        "http://127.0.0.1:8000/v1 (https; plain http only to localhost/127.0.0.1; no credentials in it)")
    model: str | None = Field(
        default=None, description="engine='openai': the served model name to ask for; None: the one base model "
        "the server lists. The server must serve the model being aligned (or its base, with LoRA loading on)")
    api_key_env: str | None = Field(
        default=None, pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="engine='openai': environment variable holding the server's API key (as for judges)")
    api_key_secret: str | None = Field(
        default=None, pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="engine='openai': name of a Prefect Secret block holding the server's API key")
    concurrency: int = Field(default=32, ge=1, le=1024, description="engine='openai': requests in flight at once")
    timeout_s: float = Field(default=600.0, gt=0, description="engine='openai': deadline of one request in seconds")
    max_retries: int = Field(default=3, ge=0, description="engine='openai': retries on 429, 5xx and timeouts")
    prompt_format: Literal["ids", "text"] = Field(
        default="ids", description="engine='openai': send each prompt as the token ids training uses ('ids': vLLM, "
        "SGLang) or as its text ('text': servers that take text only, e.g. transformers serve; refused when the "
        "server's tokenization of the text would differ from training's ids)")
    python: str | None = Field(
        default=None, description="engine='vllm': the python of the environment vLLM is installed in "
        "(scripts/install_vllm_cpu.sh makes .venv-vllm/bin/python); None: .venv-vllm/bin/python of the project")
    max_model_len: int | None = Field(default=None, ge=16,
                                      description="engine='vllm': context length vLLM reserves (None: the model's)")
    dtype: str = Field(default="auto", pattern=r"^[a-z0-9]+$",
                       description="engine='vllm': weights dtype (auto, float32, bfloat16, float16)")

    @field_validator("base_url")
    @classmethod
    def _safe_url(cls, v: str | None) -> str | None:
        return None if v is None else check_base_url(v)

    @model_validator(mode="after")
    def _engine_fields(self) -> "Generation":
        for engine, fields in _ENGINE_FIELDS.items():
            # a JSON dump carries every field: only a value other than the default is someone's intent
            stray = [f for f in fields if engine != self.engine
                     and getattr(self, f) != type(self).model_fields[f].default]
            if stray:
                raise ValueError(f"{', '.join(stray)} belong to engine='{engine}' (this section's engine is "
                                 f"'{self.engine}'): set engine='{engine}' or remove them")
        if self.engine == "openai" and not self.base_url:
            raise ValueError("engine='openai' needs base_url, e.g. http://127.0.0.1:8000/v1")
        if self.api_key_env and self.api_key_secret:
            raise ValueError("set api_key_env or api_key_secret, not both")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def key_env(self) -> str | None:
        """As OpenAIJudge.key_env: the declared variable, else OPENAI_API_KEY for api.openai.com only."""
        return endpoint_key_env(self.base_url or "", self.api_key_env, self.api_key_secret)


class Online(Section):
    iterations: int = Field(default=0, ge=0, description="K online iterations (0 = offline only)")
    prompts: str | None = Field(
        default=None, description="file of new instructions (column 'instruction'); each iteration takes fresh ones")
    prompts_per_iteration: int = Field(default=1000, ge=1, description="new instructions per iteration, never reused")
    # Before the Generation section these three lived here; a declaration (or JSON) that sets them
    # still loads: Pipeline moves them into `generation` (legacy_generation) and leaves them None.
    max_new_tokens: int | None = Field(default=None, ge=1,
                                       description="old name of generation.max_new_tokens (moved there on load)")
    greedy: bool | None = Field(default=None, description="old switch: true = generation.temperature 0, "
                                "false = sampling at generation.temperature 1 (moved there on load)")
    generation_batch_size: int | None = Field(default=None, ge=1,
                                              description="old name of generation.batch_size (moved there on load)")

    @model_validator(mode="after")
    def _needs_prompts(self) -> "Online":
        if self.iterations > 0 and not self.prompts:
            raise ValueError("online.iterations > 0 needs online.prompts: a file of new instructions")
        return self


# Online's old generation fields -> Generation's (greedy maps through _legacy_greedy).
LEGACY_ONLINE_GENERATION = {"max_new_tokens": "max_new_tokens", "greedy": "temperature",
                            "generation_batch_size": "batch_size"}


def legacy_generation(online: Any, generation: Any) -> tuple[Any, Any]:
    """(online, generation) with Online's old generation fields moved into the Generation section.

    A value the generation section sets explicitly wins only when equal; two different values
    are refused (which one meant?). An old value at its old default (256 / true / 32) moves as
    any other. Works on dicts (JSON) and on section objects alike."""
    online_data = online.model_dump(exclude_unset=True) if isinstance(online, BaseModel) else dict(online or {})
    if isinstance(generation, BaseModel):
        gen_data = generation.model_dump(exclude_unset=True)
    else:
        gen_data = dict(generation or {})
    moved = False
    for old, new in LEGACY_ONLINE_GENERATION.items():
        value = online_data.pop(old, None)
        if value is None:
            continue
        moved = True
        if old == "greedy":
            value = 0.0 if value else 1.0
        if new in gen_data and gen_data[new] != value:
            raise ValueError(f"online.{old} and generation.{new} disagree; online.{old} is the old name: "
                             f"remove it and keep generation.{new}")
        gen_data[new] = value
    if not moved:
        return online, generation
    return online_data, gen_data


class Evaluation(Section):
    heldout: str | None = Field(
        default=None, description="file of held-out prompts (column 'instruction'; optional 'reference' for NLL)")
    max_prompts: int = Field(default=500, ge=1, description="held-out prompts scored per evaluation")
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="generation length cap of the evaluation; None: generation.max_new_tokens. "
        "Evaluation always decodes greedily, one answer per prompt, with generation.engine")
    samples: int = Field(default=20, ge=0, description="sample generations kept in the report")
    champion_metric: str = Field(default="positive_rate", description="metric whose improvement moves the 'champion' alias")
    max_failed_rate: float = Field(
        default=0.05, ge=0.0, le=1.0,
        description="largest share of the evaluation's judge calls that may fail: above it the model gets no "
                    "score and is not promoted (a positive rate over the few calls that worked means little)")
    min_judged: int = Field(
        default=10, ge=1,
        description="fewest successful judge calls an evaluation needs to give a score (and promote a model)")
