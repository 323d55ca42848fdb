"""The KV cache and the per-step context that says which of its rows and positions a step reads and writes.

Below the layers that use them (layers/attention.py, models/decoder.py) and the engine that fills them.
"""
