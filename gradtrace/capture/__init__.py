"""Capture: everything that touches live torch objects while ``watch`` is open.

``runs`` (engine runs) → ``passes`` (which pass a run belongs to) → ``recorder``
(parameter and tensor hooks, pass-end hand-over); ``stats`` (device-side
statistics), ``cuts`` / ``opcuts`` (where the graph was cut), ``reach``
(which parameters a tensor's graph reaches), ``inner`` (inner products of
kept gradients), ``frames`` (whose code a Python frame runs: the one rule every
stack walk uses), ``hook_state`` (hooks put on and taken off without a trace),
``modules`` (module-tree walks), ``wrappers`` (DDP/FSDP). Nothing here renders
or judges; the analysis never imports it.
"""

# Nothing public: ``gradtrace.watch`` is the way in; the modules are imported by name.
__all__: list = []
