"""A private SoftHSM2 for the PKCS#11 tests: its own configuration and token directory under a temporary directory.

SoftHSM2 reads ``SOFTHSM2_CONF`` and scans its token directory when the module is initialised, and a PKCS#11
module is loaded once per process; tokens initialised afterwards are not seen. So there is one configuration per
test session, and every token the tests use is initialised up front (``softhsm2-util --init-token --free``).

Import it as ``from hsm import softhsm`` with ``tests/`` on ``sys.path`` (as the clock tests do with clocktools):
the ``softhsm`` fixture is session-scoped, and :func:`setup_softhsm` makes sure there is only one per process even
if several test modules import the fixture.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DEFAULT_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
MODULE_ENV = "STAMPD_PKCS11_MODULE"
INSTALL_HINT = "install SoftHSM2 (Debian: `apt-get install -y softhsm2`)"

SO_PIN = "so-pin-4711"
USER_PIN = "user-pin-0815"

TOKEN_KEYS = "stampd-keys"
"""Where the tests generate and use keys."""
TOKEN_LOGIN = "stampd-login"
"""Kept free of open signers, so a wrong PIN reaches ``C_Login`` and is refused by the token itself."""
TOKEN_SCRATCH = "stampd-scratch"
"""For tests that add, relabel and destroy objects."""
TOKEN_LABELS = (TOKEN_KEYS, TOKEN_LOGIN, TOKEN_SCRATCH)


def module_path() -> Path:
    """The SoftHSM2 module: ``$STAMPD_PKCS11_MODULE`` or Debian's path; a missing one fails the test run."""
    path = Path(os.environ.get(MODULE_ENV) or DEFAULT_MODULE)
    if not path.is_file():
        pytest.fail(f"the SoftHSM2 PKCS#11 module {path} is missing: {INSTALL_HINT}, or set {MODULE_ENV}")
    return path


def softhsm2_util() -> str:
    tool = shutil.which("softhsm2-util")
    if tool is None:
        pytest.fail(f"softhsm2-util is not on PATH: {INSTALL_HINT}")
    return tool


@dataclass(frozen=True)
class SoftHsm:
    """A SoftHSM2 configuration of our own and the tokens initialised in it (label -> user PIN)."""

    module: Path
    config: Path
    tokens: dict[str, str]

    def pin(self, label: str) -> bytes:
        return self.tokens[label].encode()


_instance: SoftHsm | None = None


def setup_softhsm(base: Path) -> SoftHsm:
    """Write ``softhsm2.conf`` under ``base``, point ``SOFTHSM2_CONF`` at it and initialise every token (once)."""
    global _instance  # noqa: PLW0603 - one SoftHSM configuration per process, see the module docstring
    if _instance is not None:
        return _instance
    module = module_path()
    tool = softhsm2_util()
    tokens_dir = base / "tokens"
    tokens_dir.mkdir(parents=True, mode=0o700)
    config = base / "softhsm2.conf"
    config.write_text(f"directories.tokendir = {tokens_dir}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(config)
    for label in TOKEN_LABELS:
        result = subprocess.run(
            [tool, "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", USER_PIN],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if result.returncode != 0:
            pytest.fail(f"softhsm2-util --init-token {label} failed:\n{result.stdout}{result.stderr}")
    _instance = SoftHsm(module=module, config=config, tokens=dict.fromkeys(TOKEN_LABELS, USER_PIN))
    return _instance


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    """The test session's SoftHSM2, with the tokens of :data:`TOKEN_LABELS` initialised."""
    return setup_softhsm(tmp_path_factory.mktemp("softhsm"))
