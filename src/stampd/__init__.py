"""stampd: an RFC 3161 Time-Stamping Authority, its client and its relying-party verifier."""

__version__ = "0.1.0"
