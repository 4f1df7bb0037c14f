"""Decoding: sampling rules, chat prompts, KV-cached generation (generate.py), continuous
batching for the server (scheduler.py), OpenAI request checks."""

from .chat_prompt import build_chat_prompt, encode_raw_prompt
from .decode_row import GenerationResult
from .sampling import SamplingConfig, SamplingError
from .scheduler import Scheduler

__all__ = [
    "GenerationResult",
    "SamplingConfig",
    "SamplingError",
    "Scheduler",
    "build_chat_prompt",
    "encode_raw_prompt",
]
