"""The architecture of ARCHITECTURE.md, checked: the import-linter contracts in pyproject.toml are kept, every
package is covered by them, and the pure core never reads the wall clock (GUIDE habit 1).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "stampd"

CORE = (
    "errors",
    "oids",
    "model",
    "ports",
    "policy",
    "issuance",
    "der",
    "verify",
    "certprofile",
    "clockgate",
    "access",
)
ADAPTERS = ("clock", "signers", "records", "server", "client", "pki", "serials", "config", "metrics", "logs")
COMPOSITION = ("app", "cli")
"""Every top-level module of stampd, by layer (ARCHITECTURE.md); a new module must be placed here."""

WALL_CLOCK_CALLS = frozenset(
    {
        "time.time",
        "time.time_ns",
        "time.monotonic",
        "time.monotonic_ns",
        "time.perf_counter",
        "time.perf_counter_ns",
        "time.clock_gettime",
        "time.clock_gettime_ns",
        "datetime.datetime.now",
        "datetime.datetime.utcnow",
        "datetime.datetime.today",
        "datetime.date.today",
    }
)
TIME_CONVERSIONS_READING_THE_CLOCK = frozenset({"time.gmtime", "time.localtime", "time.ctime", "time.asctime"})
"""Time conversions that read the clock when called without an argument."""

NAMED_IN_GUIDE = ("issuance.py", "policy.py", "der/token.py")
"""The modules GUIDE habit 1 names: time arrives as an argument (from a :class:`stampd.ports.Clock`)."""


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts: list[dict[str, object]] = config["tool"]["importlinter"]["contracts"]
    return contracts


def _lint_imports_command() -> list[str]:
    script = Path(sys.executable).with_name("lint-imports")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]


def test_import_contracts_are_kept() -> None:
    """Every contract in pyproject.toml holds (import-linter reports each as KEPT)."""
    contracts = _contracts()
    assert len(contracts) >= 4
    result = subprocess.run(
        [*_lint_imports_command(), "--no-cache", "--no-logo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"Contracts: {len(contracts)} kept, 0 broken." in output, output
    for contract in contracts:
        name = str(contract["name"])
        kept = re.search(re.escape(name).replace(r"\ ", r"\s+") + r"\s+KEPT", output)
        assert kept, f"contract {name!r} not reported as kept:\n{output}"


def _top_level_modules() -> set[str]:
    return {
        p.stem if p.is_file() else p.name
        for p in SRC.iterdir()
        if (p.is_file() and p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()
    }


def test_every_module_is_in_a_layer() -> None:
    """A module added to src/stampd must be placed in a layer here and in ARCHITECTURE.md."""
    modules = _top_level_modules()
    layered = {*CORE, *ADAPTERS, *COMPOSITION}
    assert not modules - layered, (
        f"place {sorted(modules - layered)} in a layer: CORE/ADAPTERS/COMPOSITION here, the contracts in "
        "pyproject.toml and the module table of ARCHITECTURE.md"
    )
    assert not layered - modules, f"{sorted(layered - modules)} no longer exist; remove them here and in pyproject.toml"


def test_contracts_cover_their_layers() -> None:
    """The contracts name every module of the layers they protect, so that no module escapes them unnoticed."""
    by_id = {str(c["id"]): c for c in _contracts()}
    assert set(by_id["pure-core"]["source_modules"]) == {f"stampd.{m}" for m in CORE}  # type: ignore[arg-type]
    assert set(by_id["pure-core"]["forbidden_modules"]) >= {  # type: ignore[operator]
        f"stampd.{m}" for m in (*ADAPTERS, *COMPOSITION)
    }
    asn1 = by_id["asn1-in-der-only"]
    assert asn1["source_modules"] == ["stampd.*"]
    assert asn1["ignore_imports"] == ["stampd.der.** -> asn1crypto"]


def _wall_clock_calls(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: name`` for every call in ``source`` that reads the wall clock, however it was imported."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def qualified(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return aliases.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = qualified(expr.value)
            return None if base is None else f"{base}.{expr.attr}"
        return None

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = qualified(node.func)
        if name in WALL_CLOCK_CALLS or (
            name in TIME_CONVERSIONS_READING_THE_CLOCK and not node.args and not node.keywords
        ):
            found.append(f"{filename}:{node.lineno}: {name}()")
    return found


def _core_files() -> list[Path]:
    files = []
    for name in CORE:
        package = SRC / name
        files.extend(sorted(package.rglob("*.py")) if package.is_dir() else [SRC / f"{name}.py"])
    return files


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(SRC)))
def test_core_never_reads_the_wall_clock(path: Path) -> None:
    """GUIDE habit 1: the core gets time from a Clock port, never from time.time()/datetime.now()."""
    assert _wall_clock_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))) == []


def test_wall_clock_scan_covers_the_named_modules() -> None:
    scanned = {p.relative_to(SRC).as_posix() for p in _core_files()}
    assert set(NAMED_IN_GUIDE) <= scanned


def test_wall_clock_scan_finds_every_spelling() -> None:
    """The detector itself: each way of reading the clock is found, and conversions of a given time are not."""
    source = """
import time
import time as t
import datetime
import datetime as dt
from time import time_ns, gmtime
from datetime import datetime as DT, date

time.time()
t.time_ns()
time_ns()
datetime.datetime.now()
dt.datetime.utcnow()
DT.now(tz=None)
date.today()
gmtime()
time.gmtime(0)
DT.fromtimestamp(0)
"""
    found = [line.split(": ", 1)[1] for line in _wall_clock_calls(source)]
    assert found == [
        "time.time()",
        "time.time_ns()",
        "time.time_ns()",
        "datetime.datetime.now()",
        "datetime.datetime.utcnow()",
        "datetime.datetime.now()",
        "datetime.date.today()",
        "time.gmtime()",
    ]
