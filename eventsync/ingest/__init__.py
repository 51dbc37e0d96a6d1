"""Where events come in: webhooks, the audit log, and the inbox both write to."""
