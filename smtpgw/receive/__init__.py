"""Stage 1, the Receiver: inbound SMTP sessions, their access checks and usage quotas.

Owns: everything between a client's connect and the durable commit of its message. Must never: answer 250 to end-of-data before the message is fsync'd in the spool.
"""
