"""``python -m gradtrace``: see :mod:`gradtrace.cli`."""
from .cli import main

raise SystemExit(main())
