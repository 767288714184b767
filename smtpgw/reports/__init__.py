"""What the gateway writes to people: notifications, delivery status notifications and quarantine digests.

Owns: the template language and the reports built with it. Must never: change a message's queue state.
"""
