"""Durable records of issued tokens and service events (adapters implementing :class:`stampd.ports.RecordSink`)."""
