"""Integrations with training frameworks; each module imports its framework only when imported itself.

* ``gradtrace.integrations.transformers.GradtraceCallback`` (the Hugging Face Trainer and TRL's trainers;
  ``grpo`` is what ``attach`` registers on TRL's GRPO-style trainers)
* ``gradtrace.integrations.lightning.GradtraceCallback`` (``pip install "gradtrace[lightning]"``)

Both are adapters over one step tracer (``steps``): one watch per training run, one pass per
optimizer step, the same options and printed lines.
"""

__all__: list = []  # the callbacks live in the framework modules, imported only when asked for

_MODULES = ("transformers", "lightning", "grpo", "steps", "patching")


def __getattr__(name: str):
    """``gradtrace.integrations.lightning.GradtraceCallback`` without importing the module first: a
    framework module (and its framework) is imported when it is first named."""
    if name in _MODULES:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gradtrace.integrations' has no attribute {name!r}")
