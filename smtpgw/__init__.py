"""smtpgw: an SMTP filtering relay (anti-virus via clamd, built-in anti-spam).

The package is laid out one module per pipeline stage; ARCHITECTURE.md at the
project root describes the pipeline, the modules and the on-disk layout.
"""

__version__ = "0.1.0"
PRODUCT = "smtpgw"
