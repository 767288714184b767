"""The administrator's rules as data: access rules, masks, ForwardRoute routing and the anti-virus policy.

Owns: parsing and evaluating rules. Must never: do I/O; rules are pure decisions.
"""
