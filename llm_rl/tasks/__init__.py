"""Text tasks: the embedded arithmetic task and jsonl files of (prompt, answer)."""
