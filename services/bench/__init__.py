"""`hetserve bench`: load generation against an OpenAI-compatible endpoint.

distributions.py  length distributions parsed from `fixed:128`, `uniform:64,256`, ...
workload.py       the requests of a run (prompts, max_tokens) and their arrival times
client.py         one streamed request over aiohttp SSE, timed per token chunk
stats.py          percentiles and the run summary
serve.py          the run itself: warmup, Poisson or fixed-concurrency sending
report.py         the text table and the JSON object
cli.py            `hetserve bench serve` argument parsing
"""
