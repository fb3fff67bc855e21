"""Real parts for tests, one implementation for ours, the benchmarks and developers' own tests:
throwaway SoftHSM tokens in private stores and a software TPM (``fusion_testkit.tokens``), a
site CA (``fusion_testkit.pki``), a real Archiver in a subprocess on 127.0.0.1
(``fusion_testkit.server``), a protocol-level viewer (``fusion_testkit.viewer``) and ffmpeg as
camera and judge (``fusion_testkit.camera``).

Only ``fusion_testkit.pytest_plugin`` imports pytest: it wraps these parts in fixtures and is
registered through the ``pytest11`` entry point (docs/testing.md). ``bench`` uses the parts
directly.
"""
