"""keepup2date: signed update sets of the databases and their installation.

Owns: fetching, verifying and installing update sets. Must never: install a set whose signature does not verify.
"""
