"""Public testing tools for tokenprune components and plugins.

- :func:`check_criterion`, :func:`check_selector`, :func:`check_method`: conformance suites (as
  scikit-learn's ``check_estimator``), with :func:`criterion_checks` / :func:`selector_checks` /
  :func:`method_checks` and :func:`parametrize_with_checks` for one pytest test per check.
- :mod:`tokenprune.testing.strategies`: hypothesis strategies for features, masks, budgets and
  contexts (needs ``hypothesis``, in the ``test`` extra; imported on first use).
- ``tokenprune.testing.tiny_models``: tiny random-weight models of every model family, for adapter
  tests and examples (one builder per family, registered with ``@tiny_model_builder``; import it
  explicitly: it needs transformers).
"""

from .checks import (STANDARD_SIGNALS, ConformanceError, check_criterion, check_method, check_selection,
                     check_selector, criterion_checks, example_context, example_contexts, method_checks,
                     parametrize_with_checks, selector_checks, signals_for)

__all__ = ["STANDARD_SIGNALS", "ConformanceError", "check_criterion", "check_method", "check_selection",
           "check_selector", "criterion_checks", "example_context", "example_contexts", "method_checks",
           "parametrize_with_checks", "selector_checks", "signals_for", "strategies"]


def __getattr__(name):
    if name == "strategies":  # lazy: hypothesis is a test dependency only
        import importlib

        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
