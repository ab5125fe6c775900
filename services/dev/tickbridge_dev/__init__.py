"""tickbridge's development harness: simulator, native stack, benchmarks, load generators, deploy checks.

Depends on the runtime package `tickbridge`; the runtime never imports this package (tests/test_package_split.py).
"""
