"""The fsync engine: batched, durable writes (group commit) for the spool and Maildir delivery alike; ``writer_process`` runs each batch in a child process."""
