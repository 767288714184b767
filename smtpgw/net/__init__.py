"""Network plumbing every stage shares: the event loop, the SMTP grammar and replies, DNS (wire format, stub resolver, DNSBL).

Owns: sockets, timers and protocol text. Must never: know about queues, scanning or policy.
"""
