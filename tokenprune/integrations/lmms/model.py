"""The lmms-eval model ``tokenprune``: any supported family, pruned by any method, in lmms-eval.

``lmms-eval --model tokenprune --model_args pretrained=DIR,method=divprune,budget=64 --tasks ...`` loads
the model with ``from_pretrained`` and its own processor and chat template, and answers lmms-eval's
requests with its own batched generate loop inside :func:`tokenprune.prune`. It is registered through
the ``lmms_eval.models`` entry point (:func:`tokenprune.integrations.lmms.manifest`); nothing of
lmms-eval is forked or patched, and none of lmms-eval's per-family model classes is used (they catch
errors and record empty answers; here an error inside a request raises).

This module imports without lmms-eval (the core test suite collects its doctests); the class is built
on lmms-eval's ``lmms`` base class when lmms-eval is installed, and refuses to be constructed otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

from ...budget import parse_budget
from ...errors import ConfigError, ImageError, IncompatibleComponentsError, TokenPruneError, UnsupportedModelError
from ...methods.build import accepted_parameters, create_method, method_from_config
from ...registry import methods as method_registry
from .accounting import Accounting, gather_states, one_line, summarize, write_report

try:  # lmms-eval is optional: ``pip install 'tokenprune[lmms]'``
    from lmms_eval.api.model import lmms as _LMMSBase
    _IMPORT_ERROR = None
except ModuleNotFoundError as _e:  # only lmms-eval itself missing; a broken lmms-eval raises here
    if (_e.name or "").split(".")[0] != "lmms_eval":
        raise
    _LMMSBase, _IMPORT_ERROR = object, _e

__all__ = ["TokenPruneLMM", "MODEL_ARGS", "lmms_eval_available"]

#: The model_args the model takes besides a method's own parameters.
MODEL_ARGS = ("pretrained", "method", "budget", "dtype", "device", "attn_implementation", "batch_size",
              "max_batch_size", "max_new_tokens", "seed", "prompt", "cls_fallback", "newlines", "report_path")

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}
_UNPRUNED = ("none", "unpruned", "")
#: Generation keys of lmms-eval tasks that are handled here, not passed to ``generate`` as they are.
_HANDLED_GEN_KEYS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams")


def lmms_eval_available() -> bool:
    """Whether lmms-eval can be imported (the model class is usable)."""
    return _IMPORT_ERROR is None


def _config_fingerprint(config) -> str:
    """sha256 (first 16 hex digits) of a model config without its path and version fields."""
    d = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _lmms_output_dir():
    """The folder lmms-eval writes this run's results to, or ``None`` (no ``--output_path``).

    lmms-eval hands its command-line arguments to the tasks, not to the model, so they are read from
    the frame of ``lmms_eval.evaluator.evaluate`` (the caller of ``clean``); the folder is
    ``<output_path>/<sanitized model name>``, as lmms-eval's ``EvaluationTracker`` builds it.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__") == "lmms_eval.evaluator" and "cli_args" in frame.f_locals:
            cli = frame.f_locals["cli_args"]
            out = getattr(cli, "output_path", None)
            if not out:
                return None
            from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker
            from lmms_eval.utils import sanitize_model_name

            name = GeneralConfigTracker._get_model_name(str(getattr(cli, "model_args", "") or ""))
            return Path(out) / sanitize_model_name(name) if name else Path(out)
        frame = frame.f_back
    return None


def _peak_memory(device):
    """``(MiB, kind)``: the CUDA allocator's peak on a GPU, else the process's peak resident set."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda max_memory_allocated"
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "cpu peak rss"  # KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - not on Linux
        return None, ""


class TokenPruneLMM(_LMMSBase):
    """lmms-eval model ``tokenprune``: a supported Hugging Face VLM pruned by a tokenprune method.

    Parameters (lmms-eval ``--model_args``)
    ----------------------------------------
    pretrained : str
        A local model folder or a hub id; its ``config.model_type`` must have a tokenprune adapter.
    method : str
        A registered method name (``tokenprune.list_methods()``), a path to a JSON file holding a
        method config (``PruningMethod.to_config()``, e.g. a composed method), or ``none`` (default:
        unpruned).
    budget : int, float or str
        Tokens kept (``64``), fraction kept (``0.25``) or percentage (``25%``); with a JSON config it
        replaces the config's budget (``PruningMethod.with_budget``).
    dtype : str, optional
        ``float32``, ``bfloat16``, ``float16`` or ``auto`` (default: transformers' default).
    device : str, optional
        ``cpu``, ``cuda`` or ``cuda:N``; default ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.
    attn_implementation : str, optional
        Passed to ``from_pretrained`` (``sdpa``, ``eager``, ...).
    batch_size : int
        Requests per generate call (default 1).
    max_new_tokens : int
        Used when a task's ``generation_kwargs`` give none (default 128).
    seed : int
        Seed of randomised methods (passed as ``seed=`` to factories that take one) and of the
        selection contexts (default 0).
    prompt : str, optional
        A template with ``{question}`` (and ``{image}``) used instead of the chat template.
    cls_fallback, newlines
        As :func:`tokenprune.prune`.
    report_path : str, optional
        Where to write ``tokenprune_report.json`` (a folder or a ``.json`` file); default: next to
        lmms-eval's results when it runs with ``--output_path``.
    **method_params
        Any other key is a parameter of the method's factory (``coverage_weight=1.0``,
        ``schedule=single``, ...).

    Raises
    ------
    ConfigError
        An unknown model arg (neither ours nor a parameter of the method), a bad dtype, batch size or
        budget, or a JSON config that cannot be read.
    UnknownNameError
        An unregistered method name.
    UnsupportedModelError
        A model type without an adapter, a model transformers cannot load, or (raised by
        :func:`tokenprune.prune` at load) a method that cannot run on this family.
    StageError, IncompatibleComponentsError
        A method that does not fit the model (checked at load, before any request).
    ImportError
        lmms-eval is not installed.

    Notes
    -----
    Requests are grouped by generation settings and number of images, keeping lmms-eval's order, and
    run ``batch_size`` at a time in one ``tokenprune.prune`` context each. Answers are the greedy (or
    sampled, as the task asks) continuation, cut at the task's ``until`` strings. Per request the
    pruning accounting (:mod:`tokenprune.integrations.lmms.accounting`) records visual, nominal and
    equivalent tokens, tokens per stage, selection and prefill time; lmms-eval's padding requests
    (``__padding_only__``) are answered but not counted. At the end of the run (lmms-eval's
    ``clean``) the records of every rank are gathered, rank 0 writes ``tokenprune_report.json`` and
    prints one line. ``loglikelihood`` scores the continuation with one forward per request inside
    the pruning context; methods that rate visual tokens with text attention then see the
    continuation as part of the prompt.
    """

    is_simple = True

    def __init__(self, pretrained=None, method=None, budget=None, dtype=None, device=None, attn_implementation=None,
                 batch_size=1, max_batch_size=None, max_new_tokens=128, seed=0, prompt=None, cls_fallback=None,
                 newlines="keep", report_path=None, *, model=None, processor=None, **method_params):
        if _IMPORT_ERROR is not None:
            raise ImportError("the tokenprune lmms-eval model needs lmms-eval: pip install 'tokenprune[lmms]'") \
                from _IMPORT_ERROR
        super().__init__()
        import torch

        self.batch_size = self._positive_int(batch_size, "batch_size")
        self.max_new_tokens = self._positive_int(max_new_tokens, "max_new_tokens")
        self.seed = int(seed)
        self.prompt_template = prompt
        if prompt is not None and "{question}" not in str(prompt):
            raise ConfigError(f"model_args prompt={prompt!r} needs a '{{question}}' field")
        self.report_path = report_path
        self.cls_fallback = cls_fallback
        self.newlines = newlines
        self.method_name, self.method = self._build_method(method, budget, method_params)
        torch_dtype = self._dtype(dtype)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        elif str(device) == "cuda":
            device = f"cuda:{local_rank}"
        try:
            self._device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"model_args device={device!r} is not a torch device: {e}") from None
        if self._device.type == "cuda":  # NCCL collectives (lmms-eval's and the report's) use the current device
            torch.cuda.set_device(self._device)
        if model is None:
            if not pretrained:
                raise ConfigError("model_args needs pretrained=<local model folder or hub id>")
            model, processor = self._load(str(pretrained), torch_dtype, attn_implementation)
            self.pretrained = str(pretrained)
        else:
            if processor is None:
                raise ConfigError("TokenPruneLMM(model=...) needs processor= too")
            self.pretrained = str(pretrained or getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self._model = model.to(self._device).eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        self.model_type = str(model.config.model_type)
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        if self.method is not None:
            self._check_method()
        self.accounting = Accounting()
        self.tokenprune_report = None
        self._model_args = {"pretrained": self.pretrained, "method": self.method_name,
                            "budget": None if budget is None else str(budget), **{k: str(v) for k, v in
                                                                                   sorted(method_params.items())}}

    # -- construction -----------------------------------------------------------------------------
    @staticmethod
    def _positive_int(value, name: str) -> int:
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"model_args {name}={value!r} must be a positive integer") from None
        if v < 1:
            raise ConfigError(f"model_args {name}={value!r} must be >= 1")
        return v

    @staticmethod
    def _dtype(dtype):
        import torch

        if dtype is None or str(dtype) == "auto":
            return dtype
        name = _DTYPES.get(str(dtype).lower().replace("torch.", ""))
        if name is None:
            raise ConfigError(f"model_args dtype={dtype!r}: use float32, bfloat16, float16 or auto")
        return getattr(torch, name)

    def _build_method(self, method, budget, params):
        """``(label, PruningMethod or None)`` from the ``method``/``budget`` model args and the rest."""
        if budget is not None:
            try:
                budget = parse_budget(budget)
            except TokenPruneError as e:
                raise ConfigError(f"model_args budget={budget!r}: {e}") from None
        if method is None or str(method).strip().lower() in _UNPRUNED:
            if params:
                raise ConfigError(f"unknown model_args {sorted(params)} for the tokenprune model; it takes "
                                  f"{', '.join(MODEL_ARGS)}, plus the parameters of method=NAME")
            if budget is not None:
                raise ConfigError("model_args budget= needs method=NAME (the unpruned model has no budget)")
            return "none", None
        method = str(method)
        path = Path(method)
        if method.lower().endswith(".json") or path.is_file():
            if params:
                raise ConfigError(f"unknown model_args {sorted(params)}: a method config file "
                                  f"({method!r}) takes no method parameters, only budget=")
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"model_args method={method!r}: cannot read the method config: {e}") from None
            built = method_from_config(cfg)
            if budget is not None:
                built = built.with_budget(budget)
            return method, built
        method_registry.get(method)  # UnknownNameError with suggestions
        accepted = accepted_parameters(method)
        if accepted is not None:
            unknown = sorted(k for k in params if k not in accepted)
            if unknown:
                raise ConfigError(f"unknown model_args {unknown} for the tokenprune model with method={method!r}; "
                                  f"the model takes {', '.join(MODEL_ARGS)}, the method takes "
                                  f"{', '.join(sorted(accepted))}")
        kw = dict(params)
        if budget is not None:
            kw["budget"] = budget
        if accepted is not None and "seed" in accepted and "seed" not in kw:
            kw["seed"] = self.seed
        try:
            return method, create_method(method, **kw)
        except IncompatibleComponentsError as e:
            raise ConfigError(f"model_args for method={method!r}: {e}") from None

    def _load(self, pretrained: str, dtype, attn_implementation):
        """``from_pretrained`` of a supported model and its processor (named errors otherwise)."""
        import transformers

        from ...evaluation.models import supported_model_types

        try:
            config = transformers.AutoConfig.from_pretrained(pretrained)
        except (OSError, ValueError, KeyError) as e:
            raise UnsupportedModelError(f"pretrained={pretrained!r}: transformers cannot read its config ({e})") \
                from None
        supported = supported_model_types()
        if config.model_type not in supported:
            raise UnsupportedModelError(f"pretrained={pretrained!r} is a {config.model_type!r} model, which tokenprune "
                                        f"does not support; supported types: {', '.join(supported)}")
        kw = {}
        if dtype is not None:
            kw["dtype"] = dtype
        if attn_implementation:
            kw["attn_implementation"] = str(attn_implementation)
        try:
            model = transformers.AutoModelForImageTextToText.from_pretrained(pretrained, **kw)
            processor = transformers.AutoProcessor.from_pretrained(pretrained)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise UnsupportedModelError(f"transformers could not load pretrained={pretrained!r}: {e}") from None
        return model, processor

    def _prune(self):
        """A fresh :func:`tokenprune.prune` context (``nullcontext`` unpruned)."""
        if self.method is None:
            return contextlib.nullcontext(None)
        from ...runtime import prune

        kw = {"seed": self.seed, "newlines": self.newlines}
        if self.cls_fallback is not None:
            kw["cls_fallback"] = self.cls_fallback
        return prune(self._model, self.method, **kw)

    def _check_method(self) -> None:
        """Plan the method on the model and attach its hooks once, before any request."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the [CLS] fallback notice comes again at run time
            with self._prune():
                pass

    @classmethod
    def from_model(cls, model, processor, **model_args) -> "TokenPruneLMM":
        """The lmms-eval model around an already-built model and processor (tests, notebooks).

        Parameters
        ----------
        model : transformers.PreTrainedModel
            A supported VLM.
        processor : transformers.ProcessorMixin
            Its processor (a chat template is used when it has one).
        **model_args
            As on the command line (``method``, ``budget``, ``batch_size``, ...).
        """
        return cls(model=model, processor=processor, **model_args)

    # -- lmms-eval interface ----------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        """The PIL images of one request (``[]`` for text-only docs)."""
        from PIL import Image

        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        out = []
        for v in visuals:
            if isinstance(v, (list, tuple)):
                out.extend(v)
            else:
                out.append(v)
        for v in out:
            if not isinstance(v, Image.Image):
                raise ImageError(f"task {task!r}, doc {doc_id}: the tokenprune model takes images (PIL), got "
                                 f"{type(v).__name__} {str(v)[:80]!r}; video and audio inputs are not supported")
        return [v.convert("RGB") for v in out]

    def _prompt(self, context: str, n_images: int) -> str:
        """The prompt of one request: the chat template with the images before the text, if any."""
        proc = self.processor
        image_token = getattr(proc, "image_token", None) or "<image>"
        if self.prompt_template is not None:
            return str(self.prompt_template).format(question=context, image=image_token * n_images)
        if getattr(proc, "chat_template", None) or getattr(self.tokenizer, "chat_template", None):
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": context}]
            return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=False)
        bos = getattr(self.tokenizer, "bos_token", None) or ""
        return f"{bos}{image_token * n_images} {context}" if n_images else f"{bos}{context}"

    def _encode(self, texts, images) -> dict:
        """Processor output for a batch on the model's device (left-padded)."""
        if any(images):
            inputs = self.processor(images=[list(im) for im in images], text=list(texts), return_tensors="pt",
                                    padding=True)
        else:
            inputs = self.tokenizer(list(texts), return_tensors="pt", padding=True)
        out = {}
        for k, v in dict(inputs).items():
            if hasattr(v, "to"):
                v = v.to(self._device)
                if v.is_floating_point() and self._model.dtype.is_floating_point:
                    v = v.to(self._model.dtype)
            out[k] = v
        return out

    def _n_visual(self, input_ids) -> list:
        """Image placeholder tokens per sample of a batch."""
        cfg = self._model.config
        image_id = getattr(cfg, "image_token_id", None)
        if image_id is None:
            image_id = getattr(cfg, "image_token_index", None)
        if image_id is None:
            return [0] * int(input_ids.shape[0])
        return [int(x) for x in (input_ids == image_id).sum(-1).tolist()]

    def _generation_kwargs(self, gen_kwargs) -> tuple:
        """``(until strings, kwargs for generate)`` from a task's generation settings."""
        from transformers import GenerationConfig

        gen = dict(gen_kwargs or {})
        until = gen.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ConfigError(f"generation_kwargs until={until!r} must be a string or a list of strings")
        temperature = gen.get("temperature") or 0
        do_sample = bool(gen.get("do_sample", float(temperature) > 0))
        kw = {"max_new_tokens": int(gen.get("max_new_tokens") or self.max_new_tokens), "do_sample": do_sample,
              "num_beams": int(gen.get("num_beams") or 1)}
        if do_sample:
            if temperature:
                kw["temperature"] = float(temperature)
            if gen.get("top_p") is not None:
                kw["top_p"] = float(gen["top_p"])
        known = GenerationConfig()
        extra = {k: v for k, v in gen.items() if k not in _HANDLED_GEN_KEYS}
        unknown = sorted(k for k in extra if not hasattr(known, k))
        if unknown:
            raise ConfigError(f"generation_kwargs {unknown} are not generation settings transformers knows; "
                              f"the tokenprune model does not guess what they mean")
        kw.update(extra)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if pad is not None:
            kw["pad_token_id"] = pad
        return list(until), kw

    def _timed(self):
        """Hooks timing the first top-level forward (the prefill): ``(install, remove, result dict)``."""
        import torch

        t = {}
        sync = (lambda: torch.cuda.synchronize(self._device)) if self._device.type == "cuda" else (lambda: None)

        def pre(module, args, kwargs):
            if "start" not in t:
                sync()
                t["start"] = time.perf_counter()

        def post(module, args, kwargs, output):
            if "end" not in t:
                sync()
                t["end"] = time.perf_counter()

        handles = []

        def install():
            handles.append(self._model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            handles.append(self._model.register_forward_hook(post, with_kwargs=True))

        def remove():
            for h in handles:
                h.remove()
            handles.clear()

        return install, remove, t

    def _run_batch(self, contexts, images, gen_kwargs, tasks, padding, record: bool = True) -> list:
        """Generate for one batch inside one pruning context; records the accounting. Returns texts."""
        import torch

        until, kw = self._generation_kwargs(gen_kwargs)
        texts = [self._prompt(c, len(im)) for c, im in zip(contexts, images)]
        inputs = self._encode(texts, images)
        install, remove, t = self._timed()
        with torch.no_grad(), self._prune() as report:
            install()
            try:
                gen = self._model.generate(**inputs, return_dict_in_generate=True, output_scores=True, **kw)
            finally:
                remove()
        seq = gen.sequences
        new = seq[:, seq.shape[1] - len(gen.scores):]
        outs = []
        for text in self.tokenizer.batch_decode(new, skip_special_tokens=True):
            for u in until:
                if u and u in text:
                    text = text.split(u)[0]
            outs.append(text.strip())
        if record:
            prefill_ms = (t["end"] - t["start"]) * 1e3 if "end" in t else 0.0
            self.accounting.add_batch(tasks=tasks, padding=padding, visual_tokens=self._n_visual(inputs["input_ids"]),
                                      report=report, prefill_ms=prefill_ms)
        return outs

    @staticmethod
    def _is_padding(req) -> bool:
        return bool((getattr(req, "metadata", None) or {}).get("__padding_only__", False))

    def _batches(self, keys):
        """Index batches: consecutive requests of one key, at most ``batch_size``, in first-seen key order."""
        groups: dict = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                yield idx[s:s + self.batch_size]

    def generate_until(self, requests) -> list:
        """Answer ``generate_until`` requests: ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``."""
        from tqdm.auto import tqdm

        args = [r.args for r in requests]
        visuals = [self._visuals(a[2], a[4], a[5], a[3]) for a in args]
        keys = [(json.dumps(a[1], sort_keys=True, default=str), len(v)) for a, v in zip(args, visuals)]
        out = [None] * len(requests)
        with tqdm(total=len(requests), disable=self.rank != 0, desc="tokenprune") as bar:
            for idx in self._batches(keys):
                texts = self._run_batch([args[i][0] for i in idx], [visuals[i] for i in idx], args[idx[0]][1],
                                        [args[i][4] for i in idx], [self._is_padding(requests[i]) for i in idx])
                for i, text in zip(idx, texts):
                    out[i] = text
                bar.update(len(idx))
        return out

    def generate_until_multi_round(self, requests) -> list:
        """Answer multi-round requests: ``(context, generation_kwargs, doc_to_visual, doc_to_text, doc_id, task,
        split)``; later rounds come from ``doc_to_text(doc, previous_output=..., round_idx=...,
        previous_round_info=...)``, which returns ``(visuals, context, terminal, round outputs, info)``.

        Returns, per request, the list of its round outputs.
        """
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            rounds, info, r = [], None, 0
            pad = self._is_padding(req)
            while True:
                if r > 0:
                    vis, context, terminal, _, info = doc_to_text(doc, previous_output=list(rounds), round_idx=r,
                                                                  previous_round_info=info)
                    if terminal:
                        break
                    visuals = [] if vis is None else [v.convert("RGB") for v in (vis if isinstance(vis, (list, tuple))
                                                                                  else [vis])]
                rounds.append(self._run_batch([context], [visuals], gen_kwargs, [task], [pad], record=r == 0)[0])
                r += 1
            out.append(rounds)
        return out

    def loglikelihood(self, requests) -> list:
        """``(log p(continuation | context, images), is greedy)`` per request, one forward each, pruned.

        Requests: ``(context, doc_to_target or continuation, doc_to_visual, doc_id, task, split)``.
        """
        import torch

        out = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            if not isinstance(continuation, str):
                continuation = str(continuation)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self._prompt(context, len(visuals))
            full = self._encode([prompt + continuation], [visuals])
            n_prompt = int(self._encode([prompt], [visuals])["input_ids"].shape[1])
            ids = full["input_ids"][0]
            n_cont = int(ids.shape[0]) - n_prompt
            if n_cont < 1:
                raise ConfigError(f"task {task!r}, doc {doc_id}: the continuation {continuation!r} adds no token "
                                  f"to the prompt")
            install, remove, t = self._timed()
            with torch.no_grad(), self._prune() as report:
                install()
                try:
                    logits = self._model(**full).logits[0].float()
                finally:
                    remove()
            logp = torch.log_softmax(logits[-n_cont - 1:-1], dim=-1)
            target_ids = ids[-n_cont:].to(logp.device)
            score = float(logp.gather(-1, target_ids[:, None]).sum())
            greedy = bool((logp.argmax(-1) == target_ids).all())
            out.append((score, greedy))
            prefill_ms = (t["end"] - t["start"]) * 1e3 if "end" in t else 0.0
            self.accounting.add_batch(tasks=[task], padding=[self._is_padding(req)],
                                      visual_tokens=self._n_visual(full["input_ids"]), report=report,
                                      prefill_ms=prefill_ms)
        return out

    # -- end of run -------------------------------------------------------------------------------
    def report_meta(self) -> dict:
        """What identifies this run in its report: model, method, budget, model args, versions."""
        import torch
        import transformers

        from ..._version import __version__

        try:
            from importlib.metadata import version

            lmms_version = version("lmms_eval")
        except Exception:  # pragma: no cover - not installed as a distribution
            lmms_version = None
        method_cfg = None
        if self.method is not None:
            try:
                method_cfg = self.method.to_config()
            except TokenPruneError:
                method_cfg = {"name": self.method.name}
        nominal = None if self.method is None or self.method.nominal_budget is None else \
            self.method.nominal_budget.value
        return {"model": {"pretrained": self.pretrained, "model_type": self.model_type,
                          "config_sha256": _config_fingerprint(self._model.config)},
                "method": self.method_name, "budget": nominal, "method_config": method_cfg,
                "model_args": self._model_args, "tokenprune_version": __version__, "lmms_eval_version": lmms_version,
                "transformers_version": transformers.__version__, "torch_version": torch.__version__,
                "device": str(self._device), "dtype": str(self._model.dtype).replace("torch.", "")}

    def finish(self, output_dir=None) -> dict:
        """Gather the accounting of every rank, and on rank 0 write the report and print its line.

        Every rank must call it (lmms-eval's ``clean`` does). Returns the report (every rank).
        """
        peak, kind = _peak_memory(self._device)
        rank = self.rank
        states = gather_states(self.accounting.state(rank=rank, peak_memory_mib=peak, memory_kind=kind))
        summary = summarize(states, self.report_meta())
        self.tokenprune_report = summary
        if rank == 0:
            target = self.report_path or output_dir
            if target:
                path = write_report(summary, target)
                summary["path"] = str(path)
            print(one_line(summary) + (f" | report: {summary['path']}" if "path" in summary else ""), flush=True)
        return summary

    def clean(self):
        """End of lmms-eval's requests: the report (see :meth:`finish`), then lmms-eval's own clean-up."""
        if getattr(self, "_model", None) is not None and self.tokenprune_report is None:
            self.finish(_lmms_output_dir())
        super().clean()
