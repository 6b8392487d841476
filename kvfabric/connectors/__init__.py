"""Engine connectors (vLLM, SGLang).

Each is imported only by its engine, never by ``import kvfabric``.
"""
