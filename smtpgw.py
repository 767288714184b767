#!/usr/bin/env python3
"""smtpgw: SMTP filtering relay. Run ``python3 smtpgw.py -h`` for usage."""

import sys

from smtpgw.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
