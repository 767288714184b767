"""The message itself: MIME decomposition, header editing, transfer encodings, archives, the 7-bit downgrade.

Owns: reading and rebuilding message bytes. Must never: raise on hostile input — malformed mail becomes recorded defects.
"""
