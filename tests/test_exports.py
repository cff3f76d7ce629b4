"""Every module declares __all__, and every name in it exists."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import gateway

EXTRAS = {"gateway.pipecat": "pipecat"}
"""Modules of an optional extra, and the package each needs (``.ci/run`` installs them)."""


def modules() -> list[str]:
    """Every gateway module, but those whose extra is not installed."""
    names = [m.name for m in pkgutil.walk_packages(gateway.__path__, "gateway.")]
    return [
        name
        for name in names
        if name != "gateway.__main__"
        and (name not in EXTRAS or importlib.util.find_spec(EXTRAS[name]) is not None)
    ]


def test_all_modules_declare_existing_exports() -> None:
    """Each gateway module has __all__ and each listed name is defined."""
    names = modules()
    assert "gateway.core.protocol" in names
    for name in names:
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{name} has no __all__"
        missing = [n for n in exported if not hasattr(module, n)]
        assert missing == [], f"{name} exports missing names {missing}"


def test_package_exports() -> None:
    """The top-level package exports the config and the exception tree."""
    assert set(gateway.__all__) == {
        "AuthError",
        "ClientClosed",
        "Config",
        "ConfigError",
        "GatewayError",
        "InvalidAgentFrame",
        "InvalidCaller",
        "InvalidInput",
        "StoreConflict",
        "StoreError",
        "StoreTimeout",
        "StoreUnavailable",
        "Unsealable",
        "__version__",
    }


def test_every_exception_joins_the_tree() -> None:
    """Each public exception a gateway module defines descends from GatewayError and is
    exported by the package; those that were ValueErrors still are."""
    found = {
        value
        for name in modules()
        for value in vars(importlib.import_module(name)).values()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == name
        and not value.__name__.startswith("_")
    }
    assert gateway.GatewayError in found and gateway.InvalidCaller in found
    for exc in found:
        assert issubclass(exc, gateway.GatewayError), exc
        assert getattr(gateway, exc.__name__) is exc
    for exc in (gateway.InvalidCaller, gateway.InvalidAgentFrame, gateway.Unsealable):
        assert issubclass(exc, ValueError)
