"""Write a small random Llama-family model in Hugging Face format, for demos and tests.

    python -m services.models.tiny models/tiny-llama [--arch llama|qwen2|mistral] [--seed 0]

The directory holds config.json, generation_config.json, model.safetensors, tokenizer.json
(byte-level BPE trained here on a built-in corpus), tokenizer_config.json and a chat template.
Transformers is not needed. Same arguments, same bytes.

Weights are scaled so that attention and MLP change the residual stream as much as the
embedding does (a model whose output ignores the context would hide KV cache bugs), and so
that the top two logits are far apart (float reorderings across engines keep greedy argmax).
"""

from services.models.tiny.archs import ARCHS
from services.models.tiny.write import OUTPUT_FILES, make_tiny_model

__all__ = ["ARCHS", "OUTPUT_FILES", "make_tiny_model"]
