"""3. QUEUE: the durable spool (store), the group-commit writer (commit), the runner."""
