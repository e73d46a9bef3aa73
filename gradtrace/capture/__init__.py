"""Capture: everything that touches live torch objects while ``watch`` is open.

``runs`` (engine runs) → ``passes`` (which pass a run belongs to) → ``recorder``
(parameter and tensor hooks, pass-end hand-over); ``stats`` (device-side
statistics), ``cuts`` / ``opcuts`` (where the graph was cut), ``reach``
(which parameters a tensor's graph reaches), ``inner`` (inner products of
kept gradients). Nothing here renders or judges; the analysis never imports it.
"""
