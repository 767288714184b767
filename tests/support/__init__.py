"""Test support: fixtures that start real peers (clamd, DNS, SMTP sinks, the gateway)."""
