"""Sphinx extension: the ``tokenprune-families`` directive, a table of the registered model adapters.

One row per name in ``tokenprune.registry.adapters`` (the package's families and those of installed
plugins): the ``config.model_type``, the adapter class (linked to its API page), whether the vision
tower has a [CLS] token (and whether the ``"mean_attention"`` fallback exists without one), whether
positions are 3-D M-RoPE ids, and the image layout from the class's ``layout_notes`` (else the first
line of its docstring). Registering an adapter is enough for it to appear; nothing is written by
hand.

Usage in a page::

    .. tokenprune-families::
"""

from __future__ import annotations

import inspect

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

HEADER = ("model type", "adapter", "vision [CLS]", "M-RoPE", "image layout")
WIDTHS = "16 30 16 8 30"


def _first_line(cls) -> str:
    """The first paragraph of the class docstring, on one line, or ``--``."""
    doc = inspect.getdoc(cls) or ""
    return doc.strip().split("\n\n", 1)[0].replace("\n", " ").strip() or "--"


def _class_ref(cls) -> str:
    """A ``:class:`` reference to ``cls`` when it is tokenprune's, else its dotted name as a literal."""
    mod, qual = cls.__module__, cls.__qualname__
    if mod == "tokenprune" or mod.startswith("tokenprune."):
        return f":class:`~{mod}.{qual}`"
    return f"``{mod}.{qual}``"


def _cls_cell(cls) -> str:
    """The vision [CLS] column: yes, or no with the fallback the family has."""
    if getattr(cls, "vision_cls", False):
        return "yes"
    return "no; ``mean_attention`` fallback" if getattr(cls, "supports_mean_attention", False) else "no"


def family_rows(registry) -> list:
    """``(model type, adapter, [CLS], M-RoPE, layout, source file)`` per registered adapter, by name."""
    rows = []
    for name in registry.list():
        entry = registry.entry(name)
        cls = entry.obj
        layout = getattr(cls, "layout_notes", "") or _first_line(cls)
        if entry.source != "tokenprune":
            layout = f"{layout} (from {entry.source})"
        try:
            source = inspect.getsourcefile(cls)
        except TypeError:
            source = None
        rows.append((f"``{name}``", _class_ref(cls), _cls_cell(cls), "yes" if getattr(cls, "mrope", False) else "no",
                     layout, source))
    return rows


def table_lines(rows: list) -> list:
    """The reStructuredText ``list-table`` of ``rows`` (without the source files)."""
    out = [".. list-table::", "   :header-rows: 1", f"   :widths: {WIDTHS}", ""]
    for row in [HEADER, *(r[:5] for r in rows)]:
        out.append(f"   * - {row[0]}")
        out.extend(f"     - {cell}" for cell in row[1:])
    return out


class FamiliesDirective(SphinxDirective):
    """``.. tokenprune-families::``: the table of registered model adapters."""

    has_content = False
    required_arguments = 0
    optional_arguments = 0

    def run(self) -> list:
        """Parse the generated table in place; the page is rebuilt when an adapter's source changes."""
        from tokenprune import registry

        rows = family_rows(registry.adapters)
        for source in {r[5] for r in rows if r[5]}:
            self.env.note_dependency(source)
        container = nodes.container()
        self.state.nested_parse(StringList(table_lines(rows), source="<tokenprune-families>"),
                                self.content_offset, container)
        return container.children


def setup(app) -> dict:
    """Register the directive."""
    app.add_directive("tokenprune-families", FamiliesDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
