"""The `quartet` command line: see cli/main.py."""
