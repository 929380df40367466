"""The planner: measure the machine, predict, choose, explain.

  hardware.py   what a machine can do (built-in profiles, JSON files)    probe.py   measuring this one, cached
  shape.py      module byte sizes and work per token, from the spec      workload.py  the job's lengths and size
  memory.py     what a plan holds on the device and the host             residency.py  which modules stay on the GPU
  cost.py       step and job times: bytes, FLOPs, host work, overlap     solve.py   the search, reports, entry points
  (the Plan itself, which the engine reads, is offbatch/plan.py, below both)

What is not here: the terms of each technique. A weight format sizes its modules (shape.py asks it), an
attention backend prices its KV memory and its part of a step (memory.py and cost.py ask it), and the
solver tries every registered attention backend; a new technique adds its file, not a branch here.

Entry points: solve.make_plan (build_engine calls it), solve.predict (any plan), probe.probe_hardware.
"""
