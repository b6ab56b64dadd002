"""The engines behind prefill and decode instances, by composition: a service holds a
backend (base.py's protocols) and does its bus work; the backend runs the model and moves
KV in and out of its caches. `native/` is hetserve's torch engine (tensor parallel over
several processes), `vllm/` a real vLLM engine with hetserve's KV connector."""
