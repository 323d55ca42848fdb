"""Package data: the embedded default model (a small trained MoE in Hugging Face layout)."""

from pathlib import Path

from moeserve.errors import ModelLoadError

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


def default_model_dir() -> Path:
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise ModelLoadError(
            f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; reinstall moeserve or pass --model DIR."
        )
    return DEFAULT_MODEL_DIR
