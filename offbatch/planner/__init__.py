"""The planner: measure the machine, predict, choose, explain.

  hardware.py   what a machine can do (built-in profiles, JSON files)    probe.py   measuring this one, cached
  shape.py      module byte sizes and work per token, from the spec      workload.py  the job's lengths and size
  memory.py     what a plan holds on the device and the host             residency.py  which modules stay on the GPU
  cost.py       step and job times: bytes, FLOPs, host work, overlap     solve.py   the search, reports, entry points
  (the Plan itself, which the engine reads, is offbatch/plan.py, below both)

Entry points: solve.make_plan (build_engine calls it), solve.predict (any plan), probe.probe_hardware.
"""
