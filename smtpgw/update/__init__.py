"""keepup2date: signed update sets of the databases and their installation.

Owns: fetching, verifying and installing update sets. Must never: install a set whose signature does not verify.
"""

# keepup2date's exit codes, here so that a process that only runs it (the console) names them
# without importing the updater and its HTTP client (urllib.request: 1 MiB RSS)
NO_UPDATE, UPDATED, CRITICAL, POST_UPDATE_FAILED, LICENCE, CONFIG_INVALID = 0, 1, 10, 30, 60, 75
