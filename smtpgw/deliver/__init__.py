"""Stage 4, the Sender: delivery of QUE messages to their next hops over SMTP.

Owns: outbound connections, next-hop resolution, retries. Must never: remove a message before every recipient is delivered, bounced or expired.
"""
