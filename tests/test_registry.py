"""The registry: registration, lookup, listing, and entry-point plugins (loaded, broken, blocked)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from importlib import metadata

import pytest
import torch

import tokenprune as tp
from tokenprune.errors import DuplicateNameError, PluginWarning, UnknownNameError
from tokenprune.registry import Registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def reg(monkeypatch):
    """A fresh registry with no entry points, unless a test installs some."""
    monkeypatch.delenv("TOKENPRUNE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("TOKENPRUNE_PLUGIN_BLOCKLIST", raising=False)
    monkeypatch.setattr(metadata, "entry_points", lambda **kw: [])
    return Registry("thing", "tokenprune.test_things")


# -- registration and lookup ----------------------------------------------------------------------------


def test_register_as_decorator_and_as_call(reg):
    @reg.register("alpha")
    class Alpha:
        pass

    def beta():
        return "b"

    assert reg.register("beta", beta) is beta
    assert reg.get("alpha") is Alpha and reg.get("beta") is beta
    assert "alpha" in reg and len(reg) == 2
    with pytest.raises(ValueError):
        reg.register(obj=lambda: 0)  # "<lambda>" is no usable name


def test_register_uses_the_object_name(reg):
    def gamma():
        pass

    reg.register(obj=gamma)
    assert reg.get("gamma") is gamma


@pytest.mark.parametrize("bad", ["Alpha", "with-dash", "1st", "", "has space", "_private"])
def test_names_must_be_snake_case(reg, bad):
    with pytest.raises(ValueError, match="snake_case"):
        reg.register(bad, object())


def test_duplicates_raise_unless_overwrite(reg):
    reg.register("one", 1, aliases=("uno",))
    with pytest.raises(DuplicateNameError, match="'one' is already registered"):
        reg.register("one", 2)
    with pytest.raises(DuplicateNameError, match="uno"):
        reg.register("other", 3, aliases=("uno",))
    with pytest.raises(DuplicateNameError):
        reg.register("uno", 4)
    reg.register("one", 5, overwrite=True)
    assert reg.get("one") == 5
    assert isinstance(DuplicateNameError("x"), ValueError)


def test_aliases_resolve_but_are_not_listed(reg):
    reg.register("facility", 1, aliases=("fl", "coverage_alias"))
    assert reg.get("fl") == 1 and reg.get("coverage_alias") == 1
    assert reg.list() == ["facility"]
    assert reg.entry("fl").name == "facility"
    reg.unregister("fl")
    assert "facility" not in reg and "fl" not in reg


def test_unknown_names_suggest_close_ones(reg):
    for n in ("facility_location", "fastv", "fastervlm", "random"):
        reg.register(n, n)
    with pytest.raises(UnknownNameError) as exc:
        reg.get("fastvv")
    msg = str(exc.value)
    assert "unknown thing 'fastvv'" in msg and "Did you mean 'fastv'" in msg and "Known names:" in msg
    assert exc.value.suggestions[0] == "fastv" and isinstance(exc.value, KeyError)
    with pytest.raises(UnknownNameError) as exc:
        reg.get("zzzzzz")
    assert "Did you mean" not in str(exc.value) and exc.value.suggestions == []
    with pytest.raises(TypeError):
        reg.get(3)


def test_list_patterns_and_exclude(reg):
    for n in ("fastv", "reverse_fastv", "window_fastv", "fastervlm", "tops"):
        reg.register(n, n)
    assert reg.list() == ["fastervlm", "fastv", "reverse_fastv", "tops", "window_fastv"]
    assert reg.list("*fastv") == ["fastv", "reverse_fastv", "window_fastv"]
    assert reg.list("fast*") == ["fastervlm", "fastv"]
    assert reg.list("*", exclude="*fast*") == ["tops"]
    assert reg.list("t?ps") == ["tops"]
    assert list(reg) == reg.list()


def test_name_of_and_provenance(reg):
    @dataclass(frozen=True)
    class Thing:
        x: int = 0

    reg.register("thing_a", Thing, source="my-dist", version="1.2")
    assert reg.name_of(Thing) == "thing_a" and reg.name_of(Thing(x=3)) == "thing_a"
    assert reg.name_of(object()) is None
    e = reg.entry("thing_a")
    assert (e.source, e.version) == ("my-dist", "1.2")


def test_builtins_are_in_the_global_registries():
    assert tp.registry.methods.entry("tops").source == "tokenprune"
    assert tp.registry.criteria.name_of(tp.get_criterion("coverage")()) == "coverage"
    with pytest.raises(DuplicateNameError):
        tp.register_criterion("coverage", object)


def test_public_register_functions_work_as_decorators():
    @tp.register_criterion("test_feature_norm")
    @dataclass(frozen=True, kw_only=True)
    class FeatureNorm(tp.ModularCriterion):
        tags = tp.Tags(modular=True, submodular=True, monotone=True)

        def scores(self, ctx):
            return ctx.features.float().norm(dim=-1)

    try:
        assert tp.get_criterion("test_feature_norm") is FeatureNorm
        m = tp.compose("test_feature_norm", selector="topk", budget=2)
        sel = m.select(torch.tensor([[[1.0, 0], [3.0, 0], [0, 2.0]]]))
        assert sel.indices.tolist() == [[1, 2]]
        assert tp.from_config(m.to_config()) == m  # configs name the registered criterion
    finally:
        tp.registry.criteria.unregister("test_feature_norm")


# -- entry points ---------------------------------------------------------------------------------------


class FakeDist:
    def __init__(self, name, version):
        self.metadata = {"Name": name}
        self.version = version


class FakeEP:
    """What importlib.metadata.entry_points() yields: name, value, group, dist, load()."""

    def __init__(self, name, value, obj=None, exc=None, dist=("fake-plugin", "0.3")):
        self.name, self.value, self.group = name, value, "tokenprune.test_things"
        self.dist = FakeDist(*dist) if dist else None
        self._obj, self._exc = obj, exc
        self.loads = 0

    def load(self):
        self.loads += 1
        if self._exc is not None:
            raise self._exc
        return self._obj


def _install(monkeypatch, eps):
    calls = []

    def entry_points(**kw):
        calls.append(kw)
        return [ep for ep in eps if kw.get("group") in (None, ep.group)]

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    return calls


def test_entry_points_load_lazily_once_with_provenance(reg, monkeypatch):
    good = FakeEP("plug_crit", "fake_plugin:Crit", obj=type("Crit", (), {}))
    calls = _install(monkeypatch, [good])
    reg.register("builtin", 1)
    assert calls == []  # nothing is scanned at registration or import
    assert reg.list() == ["builtin", "plug_crit"]
    assert reg.get("plug_crit") is good._obj
    assert len(calls) == 1 and good.loads == 1  # cached
    e = reg.entry("plug_crit")
    assert (e.source, e.version) == ("fake-plugin", "0.3")


def test_broken_plugin_warns_and_the_rest_still_loads(reg, monkeypatch):
    broken = FakeEP("broken", "fake_broken:Nope", exc=ImportError("No module named 'fake_broken'"))
    good = FakeEP("good", "fake_good:Thing", obj=42, dist=None)
    _install(monkeypatch, [broken, good])
    with pytest.warns(PluginWarning, match=r"could not load thing plugin 'broken' from fake-plugin.*ImportError"):
        names = reg.list()
    assert names == ["good"]
    assert reg.entry("good").source == "fake_good"  # no distribution: the module name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.get("good")  # loaded once: no second warning


def test_plugin_taking_a_registered_name_is_skipped_with_a_warning(reg, monkeypatch):
    reg.register("taken", "builtin")
    same = FakeEP("same", "x:y", obj="shared")
    reg.register("same", "shared")
    _install(monkeypatch, [FakeEP("taken", "evil:Thing", obj="plugin"), same])
    with pytest.warns(PluginWarning, match="'taken' from fake-plugin is skipped"):
        reg.list()
    assert reg.get("taken") == "builtin" and reg.get("same") == "shared"


def test_plugin_with_an_invalid_name_warns(reg, monkeypatch):
    _install(monkeypatch, [FakeEP("Bad-Name", "x:y", obj=1)])
    with pytest.warns(PluginWarning, match="could not register"):
        assert reg.list() == []


def test_autoload_can_be_disabled(reg, monkeypatch):
    calls = _install(monkeypatch, [FakeEP("plug", "x:y", obj=1)])
    monkeypatch.setenv("TOKENPRUNE_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert reg.list() == [] and calls == []
    monkeypatch.setenv("TOKENPRUNE_DISABLE_PLUGIN_AUTOLOAD", "0")
    reg.refresh()
    assert reg.list() == ["plug"]


def test_blocklist_skips_named_plugins(reg, monkeypatch):
    bad = FakeEP("blocked_one", "x:y", exc=RuntimeError("should not load"))
    _install(monkeypatch, [bad, FakeEP("fine", "x:z", obj=2)])
    monkeypatch.setenv("TOKENPRUNE_PLUGIN_BLOCKLIST", " blocked_one , other")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reg.list() == ["fine"]
    assert bad.loads == 0


def test_refresh_finds_plugins_installed_later(reg, monkeypatch):
    eps = []
    _install(monkeypatch, eps)
    assert reg.list() == []
    eps.append(FakeEP("late", "x:y", obj=3))
    assert reg.list() == []  # cached until refresh
    reg.refresh()
    assert reg.list() == ["late"]


def test_broken_plugin_in_the_global_registry_keeps_tokenprune_working(monkeypatch):
    """The real criteria registry, re-scanned with a broken entry point, warns and keeps its built-ins."""
    monkeypatch.delenv("TOKENPRUNE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    r = tp.registry.criteria
    r.list()  # load the real plugins first, so the state restored below includes them
    before = dict(r._entries)
    broken = FakeEP("broken_crit", "fake_broken:Crit", exc=SyntaxError("bad plugin"))
    broken.group = "tokenprune.criteria"
    _install(monkeypatch, [broken])
    try:
        with pytest.warns(PluginWarning, match="broken_crit"):
            r.refresh()
        assert "coverage" in tp.list_criteria() and "broken_crit" not in tp.list_criteria()
        assert tp.select("facility_location", torch.randn(1, 8, 3), budget=2).counts.tolist() == [2]
    finally:
        r._entries.clear()
        r._entries.update(before)


def test_fake_distribution_end_to_end(tmp_path):
    """A real (fake) installed distribution on sys.path: one good plugin, one broken; import works."""
    (tmp_path / "fake_good_plugin.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        import tokenprune as tp

        @dataclass(frozen=True, kw_only=True)
        class Norm(tp.ModularCriterion):
            tags = tp.Tags(modular=True, submodular=True, monotone=True)
            def scores(self, ctx):
                return ctx.features.float().norm(dim=-1)
    """))
    info = tmp_path / "fake_tokenprune_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-tokenprune-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tokenprune.criteria]\nfake_norm = fake_good_plugin:Norm\n"
                                           "fake_broken = fake_missing_module:Nope\n")
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as w:
            import tokenprune as tp
            names = tp.list_criteria()
        print("fake_norm" in names, "fake_broken" in names, "coverage" in names)
        print(tp.registry.criteria.entry("fake_norm").source, tp.registry.criteria.entry("fake_norm").version)
        print(sorted({type(x.message).__name__ for x in w}))
        import torch
        from tokenprune.testing import check_criterion
        check_criterion(tp.get_criterion("fake_norm")())
        print("conforms")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    env.pop("TOKENPRUNE_DISABLE_PLUGIN_AUTOLOAD", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "True False True"
    assert lines[1] == "fake-tokenprune-plugins 0.1"
    assert "PluginWarning" in lines[2]
    assert lines[3] == "conforms"
    # and with autoload disabled the plugin is not loaded at all
    env["TOKENPRUNE_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    out = subprocess.run([sys.executable, "-c", "import tokenprune as tp; print('fake_norm' in tp.list_criteria())"],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr



# -- what may be registered (#13) ------------------------------------------------------------------------


@pytest.mark.parametrize("register, obj", [
    (tp.register_criterion, object),  # a class, but not a Criterion
    (tp.register_criterion, 3),
    (tp.register_criterion, lambda: None),
    (tp.register_selector, tp.Criterion),  # the wrong base
    (tp.register_selector, "topk"),
    (tp.register_adapter, object()),
    (tp.register_method, 5),  # a method factory must be callable
    (tp.register_method, "fastv"),
])
def test_registering_the_wrong_kind_of_object_raises_a_named_type_error(register, obj):
    from tokenprune.errors import RegistrationError

    with pytest.raises(RegistrationError, match="'test_wrong_kind' must be") as exc:
        register("test_wrong_kind", obj)
    assert isinstance(exc.value, TypeError) and isinstance(exc.value, tp.TokenPruneError)
    for r in (tp.registry.criteria, tp.registry.selectors, tp.registry.adapters, tp.registry.methods):
        assert "test_wrong_kind" not in r


def test_registering_the_right_kind_still_works():
    from tokenprune.adapters.base import ModelAdapter

    class MyAdapter(ModelAdapter):
        pass

    class MySelector(type(tp.create_selector("topk"))):
        pass

    tp.register_adapter("test_right_adapter", MyAdapter)
    tp.register_selector("test_right_selector", MySelector)
    try:
        assert tp.get_adapter("test_right_adapter") is MyAdapter
        assert tp.get_selector("test_right_selector") is MySelector
    finally:
        tp.registry.adapters.unregister("test_right_adapter")
        tp.registry.selectors.unregister("test_right_selector")


def test_a_registry_check_also_guards_plugins(monkeypatch):
    monkeypatch.delenv("TOKENPRUNE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("TOKENPRUNE_PLUGIN_BLOCKLIST", raising=False)
    reg = Registry("thing", "tokenprune.test_things", check=lambda o: isinstance(o, int), expects="an int")
    _install(monkeypatch, [FakeEP("not_int", "x:y", obj="text"), FakeEP("an_int", "x:z", obj=2)])
    with pytest.warns(PluginWarning, match="'not_int' must be an int"):
        assert reg.list() == ["an_int"]
