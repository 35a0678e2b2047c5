"""The one list of platforms. Each platform module declares, at module level,

    PLATFORM = PlatformSpec(name="wecom", config=WeComConfig, adapter="WeComAdapter",
                            fake="hermes_green.testing.fake_wecom:FakeWeComServer")

and everything that needs to know the platforms (config's `platforms:` section, the gateway,
`check`, the demo fleet, the status page) asks this module. Adding a platform touches its module,
its fake and its tests, nothing else.

Discovery is cheap: the names are the modules of this package that declare a PLATFORM (found
by pkgutil and read as text, nothing imported), and a platform module is imported only when
something asks for its spec: the config
for a platform its file names, the gateway for a bot it runs, the fleet and `check` for theirs.
A WeCom + QQ gateway never imports the other platforms' modules (their imports: websocket and
requests pieces, lark's protobuf frame module, pydantic models: several MB and tens of ms).
A module's name is its platform's name.
"""
from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .botconfig import BotConfig

if TYPE_CHECKING:
    from .base import PlatformAdapter

# Modules of this package that are the kit, not platforms (the rest are read for a declaration).
_NOT_PLATFORMS = frozenset({"base", "kit", "botconfig", "registry", "transports", "console"})
_DECLARES = re.compile(r"^PLATFORM\s*(?::[^=]+)?=\s*PlatformSpec\(", re.M)


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
def names() -> tuple[str, ...]:
    """Every platform's name, sorted, without importing any platform module: the modules of this
    package whose source declares `PLATFORM = PlatformSpec(` at top level (read as text)."""
    from . import __path__ as pkg_path
    found = []
    for info in pkgutil.iter_modules(pkg_path):
        if info.ispkg or info.name in _NOT_PLATFORMS or info.name.startswith("_"):
            continue
        spec = info.module_finder.find_spec(f"{__package__}.{info.name}")
        origin = getattr(spec, "origin", None)
        try:
            with open(origin, encoding="utf-8") as f:
                source = f.read()
        except (OSError, TypeError):
            continue
        if _DECLARES.search(source):
            found.append(info.name)
    return tuple(sorted(found))


@lru_cache(maxsize=None)
def _load(name: str) -> PlatformSpec:
    module_name = f"{__package__}.{name}"
    module = importlib.import_module(module_name)
    spec = getattr(module, "PLATFORM", None)
    if not isinstance(spec, PlatformSpec):
        raise RuntimeError(f"{module_name} declares no PLATFORM = PlatformSpec(...) (every "
                           f"module in hermes_green/platforms/ but the kit is a platform)")
    if spec.name != name:
        raise RuntimeError(f"{module_name} declares platform {spec.name!r}; a platform module "
                           f"is named after its platform")
    return PlatformSpec(spec.name, spec.config, spec.adapter, spec.fake, module_name)


def spec(name: str) -> PlatformSpec:
    """One platform's spec (imports that platform's module, once)."""
    if name not in names():
        raise LookupError(f"unknown platform {name!r}")
    return _load(name)


def platforms() -> dict[str, PlatformSpec]:
    """Every known platform, by name, in a stable order (imports every platform module: for the
    fleet, the contract kit and the docs, not for a gateway's start)."""
    return {name: _load(name) for name in names()}


def adapter_class(name: str) -> type["PlatformAdapter"]:
    return spec(name).adapter_class()


def describe() -> list[dict[str, Any]]:
    """Name and config keys of each platform (imports every platform module)."""
    return [{"name": s.name, "keys": sorted(s.config.model_fields)} for s in platforms().values()]
