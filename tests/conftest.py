"""Test-session plugins. Token fixtures: tests/fixtures/tokens.py."""

pytest_plugins = ["tests.fixtures.tokens", "tests.fixtures.server", "tests.fixtures.rtsp",
                  "tests.fixtures.piv.stack", "tests.fixtures.parallel"]
