"""Time sources (adapters implementing :class:`stampd.ports.Clock`)."""
