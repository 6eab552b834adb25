"""Vision tasks: the embedded synthetic shapes task and tasks from local files."""
