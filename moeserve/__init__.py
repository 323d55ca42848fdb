"""moeserve: serve mixture-of-experts models whose experts do not fit on the GPU."""

from moeserve.llm import LLM
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling_params import SamplingParams
from moeserve.errors import MoeServeError

__all__ = ["LLM", "SamplingParams", "RequestOutput", "MoeServeError"]
__version__ = "0.1.0"
