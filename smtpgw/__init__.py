"""smtpgw: an SMTP filtering relay (anti-virus via clamd, built-in anti-spam).

The package follows the pipeline, one folder per stage:
receive/ → spool/ → scan/ (with spam/) → deliver/, around the shared
net/, mail/, rules/ and reports/; update/, console/ and app/ (the gateway
process, the command line, the control directory) sit beside them.
ARCHITECTURE.md at the project root walks one message through the tree.
"""

import os

__version__ = "0.1.0"
PRODUCT = "smtpgw"

# The folder of the package: shipped data (bases/, templates/, keys/) lives here.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
