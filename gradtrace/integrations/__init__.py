"""Integrations with training frameworks; each module imports its framework only when imported itself.

* ``gradtrace.integrations.lightning.GradtraceCallback`` (``pip install "gradtrace[lightning]"``)
* ``gradtrace.integrations.transformers.GradtraceCallback`` (the Hugging Face Trainer and TRL's trainers)
"""

# The submodules are imported by name: importing them here (or through ``*``) would import the frameworks.
__all__: list = []
