"""The default model's chat format: special tokens and the HF-style Jinja chat template.

One conversation turn is `<|role|>content<|end|>`; generation starts after `<|assistant|>` and the
model ends its answer with `<|end|>`, which is therefore the eos token. There is no BOS: the first
role token already marks the start. The template is stored in tokenizer_config.json, so the engine
and transformers render prompts exactly as training did (training renders through this template).
"""

from __future__ import annotations

from functools import lru_cache

import jinja2

EOS = "<|end|>"
PAD = "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, EOS, *ROLE_TOKENS.values()]  # ids 0..4, in this order

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Roles must be system, user or assistant.') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# A few system prompts mixed into training so a system message is understood as context, not a task.
TRAIN_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer with just the result.",
    "You are a careful calculator.",
    "Reply briefly.",
)


def _raise(message: str):
    raise ValueError(message)


@lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages`, as HF's apply_chat_template(tokenize=False) renders it."""
    return _template().render(messages=messages, add_generation_prompt=add_generation_prompt)
