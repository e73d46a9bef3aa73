"""``python -m benchmarks.hook_overhead [options]`` (from the repository root)."""
from .cli import main

if __name__ == "__main__":
    main()
