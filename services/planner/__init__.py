"""The planner: for a model, a workload, latency SLOs and a multi-vendor GPU inventory, choose
the GPU type, tensor/pipeline parallelism and instance count of each phase (prefill, decode) at
least cost, check the plan in a discrete-event simulation, and compare it with baselines.

Flow: spec.py (input) -> inputs.py (resolved) -> search.py (per-configuration capacities from
perf_model.py and capacity.py) -> milp.py (instance counts; oracle.py is the exhaustive check)
-> confirm.py (simulator.py) -> planner.py (with baselines.py) -> report.py / cli.py.
See docs/planner.md.
"""
