"""Real parts for the tests and the benchmarks, one implementation for both: throwaway SoftHSM
tokens and a software TPM (``harness.tokens``), and a real Archiver in a subprocess on
127.0.0.1 (``harness.server``).

Not part of the product (pyproject ships keyservice, archiver and client only). It imports no
pytest: ``tests/fixtures`` wraps it in fixtures, ``bench`` uses it directly.
"""
