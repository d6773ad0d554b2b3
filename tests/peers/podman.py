"""Placeholder: filled in by the test-peers work."""
