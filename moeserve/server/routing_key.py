"""The prefix-affinity key of a request: a hash of its prompt's first blocks of token ids.

In:  the raw body of POST /v1/completions or /v1/chat/completions, and the model's tokenizer.
Out: `prefix_key`, or None when the prompt is under one block or the body is not a well-formed request
     (the replica answers that one with its 400; routing it anywhere is fine).

The key covers the first `blocks` full KV blocks (BLOCK_TOKENS ids each; fewer when the prompt is
shorter), so requests that share those blocks share a key. Only the start of a text is tokenized: a
token never covers more than MAX_CHARS_PER_TOKEN characters of text in practice, and a cut inside the
last word only changes tokens past the blocks the key reads. For several prompts in one request the
first one decides.
"""

from __future__ import annotations

import hashlib
import json

from moeserve.kv.cache import DEFAULT_BLOCK_SIZE
from moeserve.tokenizer import Tokenizer

BLOCK_TOKENS = DEFAULT_BLOCK_SIZE  # the KV cache's block: what the prefix cache reuses
MAX_CHARS_PER_TOKEN = 64


def prefix_key(token_ids: list[int], blocks: int) -> str | None:
    """The hash of the first `blocks` full blocks of `token_ids` (as many as there are); None under one."""
    whole = min(blocks, len(token_ids) // BLOCK_TOKENS)
    if whole == 0:
        return None
    prefix = token_ids[: whole * BLOCK_TOKENS]
    return hashlib.blake2b(",".join(map(str, prefix)).encode(), digest_size=16).hexdigest()


def request_prefix_key(path: str, body: bytes, tokenizer: Tokenizer, blocks: int) -> str | None:
    try:
        request = json.loads(body)
        ids = _leading_ids(path, request, tokenizer, blocks * BLOCK_TOKENS * MAX_CHARS_PER_TOKEN)
    except Exception:  # not ours to judge: the replica answers a malformed request
        return None
    return prefix_key(ids, blocks) if ids else None


def _leading_ids(path: str, request: dict, tokenizer: Tokenizer, max_chars: int) -> list[int] | None:
    if path == "/v1/chat/completions":
        return tokenizer.encode(tokenizer.apply_chat_template(request["messages"])[:max_chars], add_special_tokens=False)
    if path != "/v1/completions":
        return None
    prompt = request["prompt"]
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # several prompts: the first one's key
    if isinstance(prompt, str):
        return tokenizer.encode(prompt[:max_chars])
    return [int(t) for t in prompt]
