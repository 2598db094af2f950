"""The stage kinds, one file each; `remote.engine.Engine` is made of their mixins plus its core (launch, poll,
finalize, resume).

- queue_stage.py: `queue` and `run` stages, a FIFO per GPU slot around remote/scheduler.py.
- service_stage.py: `service` stages, and the instances of `ray`, `swarm` and `pipeline` stages: readiness,
  captures, a service dying fails its trial, teardown in reverse order.
- ray_stage.py: a Ray cluster's readiness (`ray status`) and `executor = "ray"` cells (driver: remote/ray_task.py).
- pipeline.py: the slices, ports and ring URLs of a `pipeline` stage (planning; its instances are services).
- shape_stage.py: `shape` stages as the engine runs them; shape.py: the tc transaction they use.
- fetch_stage.py: `fetch` stages, copying result files into fetched/<trial>/<host>/.
- context.py: what a stage kind may use of the engine (a Protocol that mypy checks).
"""
