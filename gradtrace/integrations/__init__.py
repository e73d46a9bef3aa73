"""Integrations with training frameworks; each module imports its framework only when imported itself.

* ``gradtrace.integrations.transformers.GradtraceCallback`` (the Hugging Face Trainer and TRL's trainers;
  ``grpo`` is what ``attach`` registers on TRL's GRPO-style trainers)
* ``gradtrace.integrations.lightning.GradtraceCallback`` (``pip install "gradtrace[lightning]"``)

Both are adapters over one step tracer (``steps``): one watch per training run, one pass per
optimizer step, the same options and printed lines.
"""

__all__: list = []  # the callbacks live in the framework modules, imported only when asked for
