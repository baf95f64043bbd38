"""Data: demo generator, dataset layouts, readers and writers."""
