"""What Yanray knows of ChatGLM3, by model rather than by layer.

- `weights.py`: the checkpoint's config and tensors mapped onto transformers' `GlmForCausalLM`;
- `tokenizer.py`: the prompt encoder and byte-exact decoder on plain sentencepiece;
- `prompt.py`: the prompt format for the local engine (`ChatGLM3Format`): prompt ids, and a
  reply read back as answer text or a native tool call;
- `tools.py`: the native tool-call dialect (`tool_call(...)` blocks, parsed, never run).

The engine itself (`engine/local.py`, `engine/generate.py`, `engine/chat_format.py`) sees only
the `ChatFormat` protocol, so another model's format can sit beside this one.
"""
