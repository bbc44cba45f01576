"""Certificate tooling: the demo PKI that `stampd init` creates."""

from stampd.pki.demo import DemoPki, create_demo_pki

__all__ = ["DemoPki", "create_demo_pki"]
