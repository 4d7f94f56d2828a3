"""quickdraft: LLM inference with vLLM's API and exact, measurable speculative decoding."""

from quickdraft.engine.errors import RequestError, UnsatisfiableRequestError
from quickdraft.llm import LLM
from quickdraft.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from quickdraft.sampling_params import SamplingParams, StructuredOutputsParams
from quickdraft.spec_decode.config import SpeculativeConfig

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob",
           "RequestMetrics", "SpeculativeConfig", "RequestError", "UnsatisfiableRequestError"]
__version__ = "0.1.0"
