"""Builders of tiny and real-width models that only the tests use (imported as `builders.<family>`; tests/ is on the
path). The builders the library's own scripts, benchmarks and docs use stay in `trl_guard.testing`, so the installed
package ships no test-only code."""
