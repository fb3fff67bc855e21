"""Benchmarks of fusion stream encryption against the machine's limits (issue 6).

    python -m bench                    # everything (about 10 minutes on 2 cores)
    python -m bench --quick            # tiny sizes, about 30 s: keeps the code working
    python -m bench --only ingest      # one benchmark (raw, rotation, ingest, viewer)

Modules: ``core`` (the crypto core next to raw AES-256-GCM, ``python -m bench.core``), ``raw``
(AES-256-GCM on one core, disk sequential write with fsync), ``rotation`` (key rotation CPU
cost with KeyManager and an injected clock), ``ingest`` (a real uvicorn Archiver fed by a
separate load-generator process), ``viewer`` (decrypt throughput, token operations,
seek time to first byte, live latency), ``generate`` (synthetic archives through the real write
path), ``plot`` (capacity versus viewers next to Genetec's published curve).

Nothing here is imported by the product: the plaintext baseline of the Archiver can only be
switched on by ``bench.server``, which builds ``Settings`` in Python. Tokens and the Archiver
process come from ``fusion_testkit`` (shared with the tests).
"""
