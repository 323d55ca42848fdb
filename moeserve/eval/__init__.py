"""The task suite, its evaluation, and the training of the embedded default model.

`tasks` generates the suite; `evaluate` scores any model with a `chat` method on it; the
`train_*`, `build_tokenizer` and `model_card` modules build `moeserve/assets/default_model`.
"""

from moeserve.eval.evaluate import EvalReport, TaskScore, evaluate

__all__ = ["EvalReport", "TaskScore", "evaluate"]
