"""Capture: everything that touches live torch objects while ``watch`` is open.

``recorder`` (parameter and tensor hooks) → ``runs`` (which engine run a hook
fired in) → ``assign`` (which pass a run belongs to) → ``passes.Pass`` (a pass's
state from its first run to its ``PassTrace``, reading ``.grad`` through a
``reading`` strategy and reducing figures through a ``stats`` reduction);
``values`` (registered tensors' value and row facts), ``cuts`` / ``opcuts``
(where the graph was cut), ``reach`` (which parameters a tensor's graph
reaches), ``identity`` (parameters replaced while watched), ``inner`` (inner
products of kept gradients), ``frames`` (whose code a Python frame runs: the
one rule every stack walk uses), ``hook_state`` (hooks put on and taken off
without a trace), ``modules`` (module-tree walks), ``wrappers`` (DDP/FSDP).
Nothing here renders or judges; the analysis never imports it.
"""

# Nothing public: ``gradtrace.watch`` is the way in; the modules are imported by name.
__all__: list = []
