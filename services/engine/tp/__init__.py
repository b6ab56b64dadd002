"""Tensor parallelism: the ranks of one instance run the same steps in lockstep.

Every rank is an OS process with its own NativeEngine holding its shard. Rank 0, the leader,
decides each step: `LeaderEngine` broadcasts a small description of it (steps.py) over a
gloo group, CPU objects even when tensors go over NCCL, then runs it on its own shard.
`Follower.run`, on every other rank, receives each step and runs the same engine call on its
shard. The model's all-reduces tie the ranks together, so a step the leader runs without
broadcasting it first would hang the instance: run steps only through LeaderEngine.

Block ids: the leader's block manager decides them and followers use the same ids; a
follower's own block manager is never touched. Prefill steps carry each row's whole table;
decode steps carry only blocks a request gained since the follower last saw it
(`steps.BlockTables`). The leader tells followers to forget a request with the next message
after `release` or after the request finishes in a decode step.

Threading rules, per process:
- leader: any thread may call LeaderEngine's methods; a lock runs one step at a time.
- follower: `Follower.run` owns one thread and spends its idle time in a gloo receive that
  releases the GIL. Other threads may call `engine.cache.import_blocks` meanwhile, for blocks
  no running step touches: those of a request the leader has shared (`share_blocks`) but not
  yet put into a decode step. On CUDA, import on the default stream (import_blocks does), so
  the next step is queued after the copy.
- a request whose KV is imported on every rank may join decode only after the leader has
  seen it ready everywhere (`ready_everywhere`, answered by each follower's `is_ready`).
"""
