"""Text sources, cleaning and token shards."""
