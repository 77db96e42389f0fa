"""ilc plans in vLLM: a general plugin (`register`, entry point `vllm.general_plugins`) adding
`IlcLlamaForCausalLM`, a KV cache spec that frees the blocks between sinks and window, and its attention.

`layout` imports no vLLM (the main test suite checks it); the other modules need `pip install ilc[vllm]`.
Use: `ilc serve PLAN`, or `LLM(**engine_args(PLAN, MODEL_DIR))` (docs/serving.md).
"""
