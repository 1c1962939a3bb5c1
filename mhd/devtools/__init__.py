"""Developer tools: synthetic memories and a tiny offline model for tests and the demo."""
