"""``python benchmarks/hook_overhead.py [options]``: the same as ``python -m benchmarks.hook_overhead``.

Run as a script, this file's folder (benchmarks/) is first on sys.path, and
``import benchmarks.hook_overhead`` resolves to the package beside it (a
package directory wins over a module of the same name): the repository root is
put on sys.path so that the package, and this checkout's gradtrace, are found.
"""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.hook_overhead import main

    main()
