"""hetserve's own torch engine behind prefill and decode (services/engine), one process per
tensor-parallel rank: the leader here, the other ranks in *_rank.py."""
