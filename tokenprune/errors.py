"""Exceptions and warnings raised by tokenprune.

Every error derives from :class:`TokenPruneError`, and from the built-in exception a caller would
expect (``ValueError`` for bad values, ``KeyError`` for unknown names, ``TypeError`` for wrong types),
so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import difflib


class TokenPruneError(Exception):
    """Base class of every tokenprune error."""


class BudgetError(TokenPruneError, ValueError):
    """A budget is not a positive int or a float in (0, 1], or exceeds the tokens left."""


class ShapeError(TokenPruneError, ValueError):
    """Tensors disagree in shape (features, mask and signals), or have the wrong rank."""


class InvalidFeaturesError(TokenPruneError, ValueError):
    """Features or signals hold NaN or infinite values, or have an unsupported dtype."""


class MissingSignalError(TokenPruneError, ValueError):
    """A criterion or method needs a signal (relevance, text embeddings, grid, ...) that was not given."""


class IncompatibleComponentsError(TokenPruneError, TypeError):
    """Components that cannot work together, e.g. a DPP selector with a non-log-det objective."""


class DuplicateNameError(TokenPruneError, ValueError):
    """A name is registered twice in the same registry."""


class UnknownNameError(TokenPruneError, KeyError):
    """A registry has no item of that name. The message suggests close names."""

    def __init__(self, kind: str, name: str, known):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        msg = f"unknown {kind} {name!r}.{hint} Known names: {', '.join(known) or '(none)'}."
        super().__init__(msg)
        self.kind, self.name, self.suggestions = kind, name, close

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class ConfigError(TokenPruneError, ValueError):
    """A method config cannot be turned back into a method."""


class UnsupportedModelError(TokenPruneError, ValueError):
    """No adapter handles this model type, or the model lacks what a method needs (e.g. a [CLS] token)."""


class StageError(TokenPruneError, ValueError):
    """A pruning stage cannot be applied: layer beyond the model's depth, budget above the tokens left, ..."""


class StageIndexError(StageError, IndexError):
    """A stage index beyond a method's stages (``select(..., stage=i)``); also an ``IndexError``."""


class ParameterError(TokenPruneError, ValueError):
    """A parameter has a value (or type) its criterion, selector, method or call does not accept: a
    negative weight, an unknown option name, a seed that is not an int, ..."""


class PluginWarning(UserWarning):
    """A plugin failed to load, or registered a name that was already taken. tokenprune keeps working."""


class ImageError(TokenPruneError, OSError):
    """An image file is missing or cannot be read as an image."""


class DatasetError(TokenPruneError, ValueError):
    """An evaluation data file is malformed: bad JSON, or a line missing a field (the message names the line)."""


class RegistrationError(TokenPruneError, TypeError):
    """A registered object of the wrong kind: a criterion, selector or adapter that is not such a class, a
    method factory that is not callable."""


class OutputPathError(TokenPruneError, OSError):
    """An output path cannot be written: a folder where a file is expected (or the reverse), or a folder that
    cannot be created or written."""
