"""Stage 2, the spool: the durable working queue, its records and states, and the message stores (quarantine, backup, archives).

Owns: every file under QueuePath and the store folders. Must never: lose a message — every write is temp → fsync → rename → fsync dir.
"""
