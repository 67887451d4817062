"""Integrations with evaluation harnesses: the top layer, next to :mod:`tokenprune.cli`.

``tokenprune.integrations.lmms``
    An lmms-eval model named ``tokenprune`` (registered through the ``lmms_eval.models`` entry
    point; install the ``[lmms]`` extra), the pruning accounting written beside lmms-eval's scores,
    offline task templates, and the paper table built from several runs (``tokenprune report``).

Nothing below this package imports it, and importing it never imports lmms-eval: the lmms-eval model
class is built on lmms-eval's base class only when lmms-eval is installed.
"""
