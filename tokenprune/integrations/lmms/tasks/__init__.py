"""The packaged lmms-eval task template and its functions (``utils.py``); see :mod:`tokenprune.integrations.lmms`."""
