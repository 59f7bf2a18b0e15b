"""Analyses of the multi-seed studies: intervals over seeds, gold at matched proxy, the claim-4 verdict, and the
rise and fall of the gold on a learned proxy.

Only the benchmark scripts and their tests use them, so they live here rather than in the installed package; what
the package's report needs as well (`gold_at_proxy`) stays in `trl_guard.report.verdict` and is imported from there.
Scripts in benchmarks/ import them as `analysis.overoptimization` (their folder is on `sys.path`); the tests put
benchmarks/ on `sys.path` in tests/conftest.py.
"""
