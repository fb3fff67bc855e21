"""Test-session plugins. SoftHSM, viewer, Archiver and camera fixtures: the fusion_testkit plugin
(fusion_testkit/pytest_plugin.py, also registered by the installed package's pytest11 entry
point; listed here so a checkout on PYTHONPATH gets it too). TPM: tests/fixtures/tokens.py."""

pytest_plugins = ["fusion_testkit.pytest_plugin", "tests.fixtures.tokens", "tests.fixtures.server",
                  "tests.fixtures.rtsp", "tests.fixtures.piv.stack"]
