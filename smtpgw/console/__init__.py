"""The web console: HTTP(S) server, accounts, pages, routes, and the traffic history it shows.

Owns: the [smtpgw.console] listener and what it shows. Must never: change queue state except through the spool's shared operations.
"""
