"""kwserver's load-test suite: load (wrk) and the server's resource usage (psutil), measured together.

Run `python -m bench <scenario> [...]` or `python -m bench all`; see bench/README.md.
"""
