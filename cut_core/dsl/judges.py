"""Judge sections, chosen by `kind`: FunctionJudge, TransformersJudge, OpenAIJudge; the endpoint URL and key rules
the openai generation engine shares."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from cut_core.dsl.base import Section

PAPER_JUDGE_SYSTEM_PROMPT = (
    "Below is an instruction that describes a task and a potential response. Evaluate the "
    "response and provide valuable judgments to the response. If the response is perfect, "
    "please only reply with 'perfect'. Otherwise, please indicate precisely what mistakes it has."
)
PAPER_JUDGE_USER_PROMPT = "### Instruction: {instruction}\n\n### Response: {response}"
# The paper's judge prompt for a structured judge (OpenAIJudge response_format="json"): the same
# task, answered as {"verdict": "good"|"bad", "judgment": "..."} (cut_core.judge.JUDGMENT_SCHEMA).
JSON_JUDGE_SYSTEM_PROMPT = (
    "Below is an instruction that describes a task and a potential response. Evaluate the "
    "response and provide valuable judgments to the response. Reply with a JSON object with two "
    "fields: \"verdict\" is \"good\" if the response is perfect and \"bad\" otherwise; \"judgment\" "
    "indicates precisely what mistakes the response has (for a good response, write \"perfect\")."
)
DEFAULT_JUDGE_MAX_TOKENS = 512


class FunctionJudge(Section):
    kind: Literal["function"] = "function"
    callable: str = Field(
        pattern=r"^[\w.]+:[\w]+$",
        description="import path 'package.module:function' of f(instruction, response) -> judgment text or None",
    )
    name: str | None = Field(default=None, description="judge identity for caching; defaults to the callable")


class TransformersJudge(Section):
    kind: Literal["transformers"] = "transformers"
    model_path: str = Field(description="local directory of the judging causal LM")
    prompt: str = Field(
        default=PAPER_JUDGE_SYSTEM_PROMPT + "\n\n" + PAPER_JUDGE_USER_PROMPT + "\n\n### Judgment:",
        description="prompt template with {instruction} and {response}")
    max_new_tokens: int = Field(default=128, gt=0, description="judgment length cap in tokens")
    name: str | None = Field(default=None, description="judge identity for caching; defaults to model_path")


# The only host the default key variable (OPENAI_API_KEY) is ever sent to.
OPENAI_HOST = "api.openai.com"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"


def is_loopback_host(host: str | None) -> bool:
    """localhost, 127.0.0.0/8 or ::1: traffic that never leaves this machine."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(v: str) -> str:
    """The rules every OpenAI-compatible endpoint obeys (judges and generation engines alike): an
    http(s) URL with a host, no credentials, query or fragment; plain http only to loopback."""
    # Messages never repeat the URL: it may be the very credential being refused.
    from urllib.parse import urlsplit
    try:
        url = urlsplit(v)
        host = url.hostname
        url.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError("base_url is not a valid URL") from None
    if url.scheme not in ("http", "https") or not host:
        raise ValueError("base_url must be an http(s) URL with a host, e.g. https://api.openai.com/v1")
    if url.username is not None or url.password is not None or "@" in url.netloc:
        raise ValueError("base_url must not carry credentials (user:password@); put the key in the "
                         "environment variable named by api_key_env")
    if url.query or url.fragment or "?" in v or "#" in v:
        raise ValueError("base_url must not carry a query string or fragment (keys in URLs leak into logs); "
                         "put the key in the environment variable named by api_key_env")
    if url.scheme == "http" and not is_loopback_host(host):
        raise ValueError("base_url must be https unless the host is localhost/127.0.0.1 "
                         "(reach a plain-http server on another machine through an SSH tunnel to localhost)")
    return v


def endpoint_key_env(base_url: str, api_key_env: str | None, api_key_secret: str | None) -> str | None:
    """The environment variable whose value is sent as the key: the declared one, else
    OPENAI_API_KEY when (and only when) the endpoint is https://api.openai.com."""
    if api_key_env or api_key_secret:
        return api_key_env
    from urllib.parse import urlsplit
    url = urlsplit(base_url)
    return DEFAULT_API_KEY_ENV if url.scheme == "https" and url.hostname == OPENAI_HOST else None


class OpenAIJudge(Section):
    kind: Literal["openai"] = "openai"
    base_url: str = Field(description="OpenAI-compatible endpoint: https (plain http only to localhost/127.0.0.1), "
                          "no credentials or query string in it, e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    model: str = Field(description="model name sent in the request")
    api_key_env: str | None = Field(
        default=None, pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="name of the environment variable holding the API key (e.g. OPENAI_API_KEY; upper-case letters, "
                    "digits, _). Unset: OPENAI_API_KEY for https://api.openai.com only, no key to any other host")
    api_key_secret: str | None = Field(
        default=None, pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="name of a Prefect Secret block holding the API key (lower-case letters, digits, -)")
    system_prompt: str = Field(default=PAPER_JUDGE_SYSTEM_PROMPT, description="system message (the paper's by default)")
    user_prompt: str = Field(default=PAPER_JUDGE_USER_PROMPT, description="user message template with {instruction} and {response}")
    concurrency: int = Field(default=8, ge=1, le=256, description="requests in flight at once")
    max_retries: int = Field(default=5, ge=0, description="retries on 429, 5xx and timeouts (never on other 4xx)")
    timeout_s: float = Field(default=60.0, gt=0,
                             description="deadline in seconds of one call (connect, send, wait and read, all together)")
    max_response_bytes: int = Field(default=262_144, ge=1024,
                                    description="largest reply accepted, in bytes; a longer one is a failed call")
    temperature: float = Field(default=0.0, ge=0, description="sampling temperature of the judge")
    max_tokens: int = Field(
        default=DEFAULT_JUDGE_MAX_TOKENS, ge=1,
        description="longest judge reply in tokens, sent as max_tokens; a reply cut by it is a failed call "
                    "(without a cap a server writes up to its own limit)")
    response_format: Literal["text", "json"] = Field(
        default="text",
        description="'text': the reply is the judgment, polarity by the positive prefixes (the paper's protocol); "
                    "'json': the reply is {verdict: good|bad, judgment}, asked for with a json_schema "
                    "response_format; polarity from verdict, and a reply that does not parse is a failed call")
    name: str | None = Field(default=None, description="judge identity for caching; defaults to base_url + model")

    @model_validator(mode="before")
    @classmethod
    def _json_prompt(cls, data: Any) -> Any:
        # A structured judge without its own system prompt gets the paper's prompt in JSON form
        # (the paper's asks for a bare 'perfect', which contradicts the schema).
        if isinstance(data, dict) and data.get("response_format") == "json" and "system_prompt" not in data:
            data = {**data, "system_prompt": JSON_JUDGE_SYSTEM_PROMPT}
        return data

    @field_validator("base_url")
    @classmethod
    def _safe_url(cls, v: str) -> str:
        return check_base_url(v)

    @model_validator(mode="after")
    def _one_key_source(self) -> "OpenAIJudge":
        if self.api_key_env and self.api_key_secret:
            raise ValueError("set api_key_env or api_key_secret, not both")
        return self

    def key_env(self) -> str | None:
        """The environment variable whose value is sent as the key: the declared one, else
        OPENAI_API_KEY when (and only when) the endpoint is https://api.openai.com."""
        return endpoint_key_env(self.base_url, self.api_key_env, self.api_key_secret)


Judge = Annotated[Union[FunctionJudge, TransformersJudge, OpenAIJudge], Field(discriminator="kind")]
