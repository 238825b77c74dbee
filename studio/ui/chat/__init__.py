"""The Chat tab: thread list, streaming message view, per-thread settings, search, export/import."""
