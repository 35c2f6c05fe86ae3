"""OpenAI-compatible request bodies (pydantic) and the OpenAI error body.

Fields the engine cannot honour (n > 1, logprobs, penalties, logit_bias, stop strings) are
rejected with a 400 rather than silently ignored; unknown fields are rejected too. Fields are
strict: each takes its JSON type only (no "yes" for true, no "5" or true for 5); an int is
accepted for a float. Extra fields of this server: `energy_budget`, `prompt_budget`,
`controller`, `top_k`, `ignore_eos`, `stop_token_ids`.
"""
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..control.registry import CONTROLLER_NAMES
from ..engine.llm_engine import check_budget

# Fields the engine cannot honour: accepted only at their neutral value, else a 400 that says why.
_NEUTRAL = {
    "n": (lambda v: v == 1, "only n=1 is supported"),
    "stop": (lambda v: not v, "stop strings are not supported: use stop_token_ids"),
    "presence_penalty": (lambda v: v == 0, "penalties are not supported: leave them at 0"),
    "frequency_penalty": (lambda v: v == 0, "penalties are not supported: leave them at 0"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "logprobs": (lambda v: v is None or v is False, "logprobs is not supported"),
    "best_of": (lambda v: v is None or v == 1, "best_of is not supported"),
    "suffix": (lambda v: v is None, "suffix is not supported"),
    "echo": (lambda v: not v, "echo is not supported"),
}


@classmethod
def _neutral_only(cls, value, info):
    accepted, message = _NEUTRAL[info.field_name]
    if not accepted(value):
        raise ValueError(message)
    return value


def _one_of(accepted: str):
    """A wrap validator for a union field: one message naming what the field accepts, instead of
    one error per member of the union ("controller.str: Input should be a valid string")."""
    @classmethod
    def validate(cls, value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"must be {accepted}") from None
    return validate


class APIError(Exception):
    """An HTTP error answered with the OpenAI error body (and `headers`, if given)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    model_config = _STRICT

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)
    n: int = 1
    seed: Optional[int] = Field(None, ge=0, lt=2**63)     # torch seeds are 64-bit
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list, None] = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict] = None
    user: Optional[str] = None
    energy_budget: Optional[float] = None
    prompt_budget: Optional[float] = None
    controller: Union[str, list[int], None] = None

    @field_validator("energy_budget", "prompt_budget", mode="before")
    @classmethod
    def _budget(cls, value, info):
        return None if value is None else check_budget(value, info.field_name)

    _controller = field_validator("controller", mode="wrap")(_one_of(
        f"a controller name ({', '.join(CONTROLLER_NAMES)}) or a list of per-layer action codes, "
        "one per layer: 0 PROCESS, 1 SKIP, 2 EXIT"))

    _unsupported = field_validator("n", "stop", "presence_penalty", "frequency_penalty",
                                   "logit_bias")(_neutral_only)


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    _prompt = field_validator("prompt", mode="wrap")(_one_of(
        "a string, a list of token ids, or a list holding one of these"))
    _unsupported_here = field_validator("logprobs", "best_of", "suffix", "echo")(_neutral_only)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    _content = field_validator("content", mode="wrap")(_one_of(
        'a string or a list of text parts ({"type": "text", "text": "..."})'))

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False

    _unsupported_here = field_validator("logprobs")(_neutral_only)


def parse_request(model_cls, body):
    """Validates a decoded JSON body; a bad one raises APIError 400 naming the first problem."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {message}" if param else message, param=param) from None
