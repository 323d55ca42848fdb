"""The generation engine: sequences, scheduler, model runner, sampler and the step loop (LLMEngine).

Runs any model on the expert providers it is handed; the public `LLM` (moeserve/llm.py) wires it to
the loader and the offloading runtime. The KV cache and step context are in moeserve/kv/.
"""
