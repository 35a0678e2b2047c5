"""The one list of platforms. Each platform module declares, at module level,

    PLATFORM = PlatformSpec(name="wecom", config=WeComConfig, adapter="WeComAdapter",
                            fake="hermes_green.testing.fake_wecom:FakeWeComServer")

and everything that needs to know the platforms (config's `platforms:` section, the gateway,
`check`, the demo fleet, the status page) asks this module. Adding a platform touches its module,
its fake and its tests, nothing else.

Discovery imports the platform modules (cheap by rule: a module keeps heavy SDK imports inside
the functions that need them); the adapter class is looked up by name on first use.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .botconfig import BotConfig

if TYPE_CHECKING:
    from .base import PlatformAdapter

# Modules of this package that are the kit, not platforms.
_NOT_PLATFORMS = frozenset({"base", "kit", "botconfig", "registry", "transports", "console"})


@dataclass(frozen=True)
class PlatformSpec:
    name: str
    config: type[BotConfig]
    adapter: str  # class name in the declaring module
    fake: str | None = None  # "module:Class" of the strict fake server (hermes_green.testing)
    module: str = ""  # filled in by discovery

    def adapter_class(self) -> type["PlatformAdapter"]:
        return getattr(importlib.import_module(self.module), self.adapter)

    def fake_class(self) -> type | None:
        if self.fake is None:
            return None
        module, _, cls = self.fake.partition(":")
        return getattr(importlib.import_module(module), cls)


@lru_cache(maxsize=1)
def _discover() -> dict[str, PlatformSpec]:
    from . import __path__ as pkg_path, __name__ as pkg_name
    specs: dict[str, PlatformSpec] = {}
    for info in sorted(pkgutil.iter_modules(pkg_path), key=lambda i: i.name):
        if info.name in _NOT_PLATFORMS or info.name.startswith("_"):
            continue
        module_name = f"{pkg_name}.{info.name}"
        module = importlib.import_module(module_name)
        spec = getattr(module, "PLATFORM", None)
        if not isinstance(spec, PlatformSpec):
            continue
        if spec.name in specs:
            raise RuntimeError(f"platform {spec.name!r} declared twice ({module_name})")
        specs[spec.name] = PlatformSpec(spec.name, spec.config, spec.adapter, spec.fake,
                                        module_name)
    return specs


def platforms() -> dict[str, PlatformSpec]:
    """Every known platform, by name, in a stable order."""
    return dict(_discover())


def spec(name: str) -> PlatformSpec:
    try:
        return _discover()[name]
    except KeyError:
        raise LookupError(f"unknown platform {name!r}") from None


def adapter_class(name: str) -> type["PlatformAdapter"]:
    return spec(name).adapter_class()


def describe() -> list[dict[str, Any]]:
    """For the status page and `check`: name and config keys of each platform."""
    return [{"name": s.name, "keys": sorted(s.config.model_fields)} for s in _discover().values()]
