"""anee_fast: adaptive-depth transformer decoding on a paged KV cache."""
from .actions import EXIT, PROCESS, SKIP
from .ops.backends import backends
from .llm import LLM, RequestOutput
from .engine.sampling import SamplingParams
from .trace import Trace

__all__ = ["LLM", "SamplingParams", "RequestOutput", "Trace", "backends", "PROCESS", "SKIP", "EXIT",
           "ANEEConfig", "ANEEWrapper"]


def __getattr__(name):
    # The ANEE drop-in imports transformers' generation pieces: load it only when asked for.
    if name in ("ANEEConfig", "ANEEWrapper"):
        from .compat import anee as anee_compat
        return getattr(anee_compat, name)
    raise AttributeError(name)
