"""The `stampd` command line."""
