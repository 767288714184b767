#!/usr/bin/env python3
"""smtpgw: SMTP filtering relay. Run ``python3 smtpgw.py -h`` for usage."""

import sys

import smtpgw

if __name__ == "__main__":
    # the gateway needs the standard library only: run again without site packages (smtpgw.CHILD_OPTIONS)
    smtpgw.without_site(sys.orig_argv)
    from smtpgw.app.cli import main

    sys.exit(main())
