"""Capture: everything that touches live torch objects while ``watch`` is open.

``recorder`` (parameter and tensor hooks) → ``runs`` (which engine run a hook
fired in) → ``assign`` (which pass a run belongs to) → ``passes.Pass`` (a pass's
state from its first run to its ``PassTrace``, reading ``.grad`` through a
``reading`` strategy and reducing figures through a ``stats`` reduction);
``values`` (registered tensors' value and row facts), ``cuts`` / ``opcuts``
(where the graph was cut), ``reach`` (which parameters a tensor's graph
reaches), ``identity`` (parameters replaced while watched), ``inner`` (inner
products of kept gradients). Nothing here renders or judges; the analysis
never imports it.
"""
