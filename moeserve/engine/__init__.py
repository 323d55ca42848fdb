"""The generation engine: sequences, KV cache, scheduler, model runner, sampler and the LLM class."""
