"""servelm: a readable engine for serving generative language models efficiently."""

from servelm.config import EngineConfig
from servelm.engine.engine import LLMEngine
from servelm.llm import LLM
from servelm.outputs import CompletionOutput, Logprob, RequestOutput
from servelm.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
