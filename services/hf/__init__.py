"""A local Hugging Face model directory without transformers: config.json, the tokenizer and
its chat template, streamed detokenization and stop strings. No torch."""
