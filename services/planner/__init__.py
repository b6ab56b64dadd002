"""The planner: for a model, a workload, latency SLOs and a multi-vendor GPU inventory, choose
the GPU type, tensor/pipeline parallelism and instance count of each role (prefill, decode,
or colocated: both phases on one instance) at least cost, check the plan in a discrete-event
simulation, and compare it with baselines, which are candidates for the plan too.

Flow: spec.py (input) -> inputs.py (resolved) -> search.py (per-configuration capacities from
perf_model.py and capacity.py) -> milp.py (instance counts; oracle.py is the exhaustive check)
-> confirm.py (simulator.py) -> planner.py (with baselines.py; outcome.py and speeds.py say
what a plan amounts to) -> report.py / topology.py / cli.py. See docs/planner.md.
"""
