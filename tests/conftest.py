"""Shared fixtures. Each area's fixtures live in tests/support/<area>.py."""

pytest_plugins = [
    "tests.support.net",
    "tests.support.tls",
    "tests.support.clamd",
    "tests.support.dns",
]
