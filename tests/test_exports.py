"""Every module declares __all__, and every name in it exists."""

from __future__ import annotations

import importlib
import pkgutil

import gateway


def test_all_modules_declare_existing_exports() -> None:
    """Each gateway module has __all__ and each listed name is defined."""
    names = [m.name for m in pkgutil.walk_packages(gateway.__path__, "gateway.")]
    assert "gateway.core.protocol" in names
    for name in names:
        if name == "gateway.__main__":
            continue
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{name} has no __all__"
        missing = [n for n in exported if not hasattr(module, n)]
        assert missing == [], f"{name} exports missing names {missing}"


def test_package_exports() -> None:
    """The top-level package exports the config and the exception tree."""
    assert set(gateway.__all__) == {
        "Config",
        "ConfigError",
        "GatewayError",
        "StoreConflict",
        "StoreError",
        "StoreTimeout",
        "StoreUnavailable",
        "__version__",
    }
