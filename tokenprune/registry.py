"""One generic registry for criteria, selectors, methods and adapters.

Built-ins and plugins go through the same :meth:`Registry.register`. Plugins are found through the
entry-point groups ``tokenprune.criteria``, ``tokenprune.selectors``, ``tokenprune.methods`` and
``tokenprune.adapters``; each group is loaded lazily, once, the first time its registry is read. A
plugin that fails to import, or that claims a name already taken, gives a :class:`PluginWarning` and
is skipped: ``import tokenprune`` never breaks because of a plugin.

Set ``TOKENPRUNE_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry points, or list names to skip in
``TOKENPRUNE_PLUGIN_BLOCKLIST`` (comma-separated entry-point names).
"""

from __future__ import annotations

import fnmatch
import os
import re
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Generic, Iterable, TypeVar

from .errors import DuplicateNameError, PluginWarning, RegistrationError, UnknownNameError

T = TypeVar("T")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered item and where it came from."""

    name: str
    obj: T
    source: str = "tokenprune"  # distribution name for plugins
    version: str | None = None
    aliases: tuple = ()


class Registry(Generic[T]):
    """Named items of one kind.

    Parameters
    ----------
    kind : str
        What is registered ("criterion", "selector", "method", "adapter"), used in messages.
    group : str
        The entry-point group scanned for plugins.
    check : callable, optional
        ``check(obj) -> bool``: whether ``obj`` may be registered (default: anything may).
    expects : str
        What ``check`` accepts, for the message of :class:`~tokenprune.errors.RegistrationError`.
    """

    def __init__(self, kind: str, group: str, check: Callable[[object], bool] | None = None, expects: str = ""):
        self.kind = kind
        self.group = group
        self.check = check
        self.expects = expects
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}
        self._plugins_loaded = False
        self._loading = False

    # -- registration -------------------------------------------------------------------------------
    def register(self, name: str | None = None, obj: T | None = None, *, aliases: Iterable[str] = (),
                 overwrite: bool = False, source: str = "tokenprune", version: str | None = None):
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")`` or called directly.

        Raises
        ------
        ValueError
            If the name is not lower-case snake case.
        DuplicateNameError
            If the name or an alias is taken and ``overwrite`` is false.
        RegistrationError
            If the registry's ``check`` rejects ``obj`` (e.g. a criterion that is not a
            :class:`~tokenprune.criteria.base.Criterion` class); also a ``TypeError``.
        """

        def add(o: T) -> T:
            key = name if name is not None else getattr(o, "__name__", None)
            if not isinstance(key, str) or not _NAME.match(key):
                raise ValueError(f"{self.kind} names must be lower-case snake_case identifiers, got {key!r}")
            for k in (key, *aliases):
                if not _NAME.match(k):
                    raise ValueError(f"{self.kind} alias must be lower-case snake_case, got {k!r}")
                taken = k in self._entries or k in self._aliases
                if taken and not overwrite:
                    owner = self._entries.get(self._aliases.get(k, k))
                    raise DuplicateNameError(f"{self.kind} {k!r} is already registered"
                                             + (f" by {owner.source}" if owner else "")
                                             + "; pass overwrite=True to replace it")
            if self.check is not None and not self.check(o):
                expects = self.expects or "accepted by the registry's check"
                raise RegistrationError(f"{self.kind} {key!r} must be {expects}, got {o!r} of type {type(o).__name__}")
            self._entries[key] = Entry(key, o, source, version, tuple(aliases))
            for a in aliases:
                self._aliases[a] = key
            return o

        if obj is not None:
            return add(obj)
        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (or the item an alias points to) and its aliases.

        Raises
        ------
        UnknownNameError
            No item of that name.
        """
        entry = self._entries.pop(self._resolve(name))
        for a in entry.aliases:
            self._aliases.pop(a, None)

    # -- lookup ------------------------------------------------------------------------------------
    def _resolve(self, name: str) -> str:
        self._load_plugins()
        key = self._aliases.get(name, name)
        if key not in self._entries:
            raise UnknownNameError(self.kind, name, list(self._entries) + list(self._aliases))
        return key

    def get(self, name: str) -> T:
        """The item registered as ``name`` (or an alias). Raises :class:`UnknownNameError`."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}")
        return self._entries[self._resolve(name)].obj

    def create(self, name: str, /, **params):
        """Call the item registered as ``name`` with ``params``: an instance of a registered class.

        ``get`` returns what was registered (a class, or a method factory); ``create`` builds with
        it, as timm's ``create_model``. ``O(1)`` lookup plus the constructor's cost.

        Raises
        ------
        UnknownNameError
            No item of that name.
        TypeError
            ``name`` is not a str, or a parameter the constructor does not take.

        Examples
        --------
        >>> from tokenprune import registry
        >>> registry.selectors.create("topk", largest=False).largest
        False
        """
        return self.get(name)(**params)

    def entry(self, name: str) -> Entry[T]:
        """The :class:`Entry` (item, source distribution, version, aliases) registered as ``name``.

        Raises
        ------
        UnknownNameError
            No item of that name.
        """
        return self._entries[self._resolve(name)]

    def list(self, pattern: str = "*", exclude: str | None = None) -> list[str]:
        """Sorted registered names matching a shell-style ``pattern`` (aliases not listed)."""
        self._load_plugins()
        names = [n for n in self._entries if fnmatch.fnmatchcase(n, pattern)]
        if exclude:
            names = [n for n in names if not fnmatch.fnmatchcase(n, exclude)]
        return sorted(names)

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._entries or name in self._aliases

    def __iter__(self):
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())

    def name_of(self, obj) -> str | None:
        """The name an item (or its class) is registered under, or ``None``."""
        self._load_plugins()
        for e in self._entries.values():
            if e.obj is obj or e.obj is type(obj):
                return e.name
        return None

    # -- plugins -----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Scan the entry-point group again (after installing a plugin in a running process)."""
        self._plugins_loaded = False
        self._load_plugins()

    def _load_plugins(self) -> None:
        if self._plugins_loaded or self._loading:
            return
        self._plugins_loaded = True
        if os.environ.get("TOKENPRUNE_DISABLE_PLUGIN_AUTOLOAD", "").strip() not in ("", "0"):
            return
        blocked = {b.strip() for b in os.environ.get("TOKENPRUNE_PLUGIN_BLOCKLIST", "").split(",") if b.strip()}
        self._loading = True
        try:
            for ep in metadata.entry_points(group=self.group):
                if ep.name in blocked:
                    continue
                dist = getattr(ep, "dist", None)
                source = dist.metadata["Name"] if dist is not None else ep.value.split(":")[0]
                version = dist.version if dist is not None else None
                try:
                    obj = ep.load()
                except Exception as exc:  # a broken plugin must never break tokenprune
                    warnings.warn(f"tokenprune: could not load {self.kind} plugin {ep.name!r} from {source} "
                                  f"({ep.value}): {type(exc).__name__}: {exc}", PluginWarning, stacklevel=2)
                    continue
                existing = self._entries.get(ep.name)
                if existing is not None:
                    if existing.obj is not obj:
                        warnings.warn(f"tokenprune: {self.kind} plugin {ep.name!r} from {source} is skipped: "
                                      f"the name is already registered by {existing.source}",
                                      PluginWarning, stacklevel=2)
                    continue
                try:
                    self.register(ep.name, obj, source=source, version=version)
                except Exception as exc:
                    warnings.warn(f"tokenprune: could not register {self.kind} plugin {ep.name!r} from "
                                  f"{source}: {exc}", PluginWarning, stacklevel=2)
        finally:
            self._loading = False


def make_api(registry: Registry) -> tuple[Callable, Callable, Callable]:
    """``(register, get, list)`` functions bound to ``registry``, named and documented for its kind.

    They become ``tokenprune.register_criterion``, ``tokenprune.get_criterion``,
    ``tokenprune.list_criteria`` and so on. ``get`` returns what was registered (a class, or a
    method factory) and builds nothing; :meth:`Registry.create` builds.
    """
    kind, plural = registry.kind, registry.group.rsplit(".", 1)[-1]

    def register(name=None, obj=None, **kw):
        return registry.register(name, obj, **kw)

    def get(name):
        return registry.get(name)

    def list_(pattern="*", exclude=None):
        return registry.list(pattern, exclude)

    register.__doc__ = f"""Register a {kind}: ``@register_{kind}("name")``, or ``register_{kind}("name", obj)``.

    Keywords (``aliases``, ``overwrite``, ``source``, ``version``) as :meth:`Registry.register`.
    Plugins register through the entry-point group ``{registry.group}``.

    Raises
    ------
    ValueError
        The name is not lower-case snake case.
    DuplicateNameError
        The name or an alias is taken and ``overwrite`` is false.
    RegistrationError
        The object is not {registry.expects or 'accepted'} (also a ``TypeError``).
    """
    get.__doc__ = f"""The {kind} registered as ``name`` (or an alias), as registered: a class (a method: its factory).

    ``O(1)`` after the plugins of ``{registry.group}`` are loaded (once).

    Raises
    ------
    UnknownNameError
        No {kind} of that name (the message suggests close names).
    TypeError
        ``name`` is not a str.
    """
    list_.__doc__ = f"""Sorted names of the registered {plural} matching the shell-style ``pattern``.

    Names matching ``exclude`` are left out; aliases are not listed. ``O(R log R)`` for ``R`` entries.
    """
    for fn, fname in ((register, f"register_{kind}"), (get, f"get_{kind}"), (list_, f"list_{plural}")):
        fn.__name__ = fn.__qualname__ = fname
    return register, get, list_


def subclass_check(module: str, qualname: str) -> Callable[[object], bool]:
    """A registry check: is the object a class derived from ``module.qualname``?

    The base is matched by its module and qualified name along the MRO, so this ground-layer module
    checks criteria, selectors and adapters without importing the layers that define their bases.
    """

    def check(obj) -> bool:
        return isinstance(obj, type) and any(getattr(c, "__module__", None) == module
                                             and getattr(c, "__qualname__", None) == qualname for c in obj.__mro__)

    check.__name__ = f"subclass_of_{qualname}"
    return check


criteria: Registry = Registry("criterion", "tokenprune.criteria",
                              check=subclass_check("tokenprune.criteria.base", "Criterion"),
                              expects="a subclass of tokenprune.Criterion")
selectors: Registry = Registry("selector", "tokenprune.selectors",
                               check=subclass_check("tokenprune.selectors.base", "Selector"),
                               expects="a subclass of tokenprune.Selector")
methods: Registry = Registry("method", "tokenprune.methods", check=callable,
                             expects="a callable method factory ((budget=..., **params) -> PruningMethod)")
adapters: Registry = Registry("adapter", "tokenprune.adapters",
                              check=subclass_check("tokenprune.adapters.base", "ModelAdapter"),
                              expects="a subclass of tokenprune.adapters.base.ModelAdapter")
