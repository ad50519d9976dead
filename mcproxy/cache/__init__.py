"""The embedded cache: items and memory, text and meta commands."""
