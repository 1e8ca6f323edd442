"""What the benchmarks, the demo and the tests drive edgemeta through, kept out of the product.

``harness``: the real daemon as a child process, files dropped the way producers drop them, the
metrics endpoint and ``status.json`` read back; bundles trained once and cached. ``streams``:
switching and recurring streams of a task family, and the per-row loss every comparison uses.
No production package imports this one (an import contract in pyproject.toml).
"""
