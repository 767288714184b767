"""Stage 3, the scanner: scanner worker processes, one message's anti-virus and anti-spam job, the clamd client and iChecker.

Owns: WFC → CHK → QUE. Must never: pass a message on unscanned; a failed scan is deferred or kept, never delivered.
"""
