"""The user's model enters through one small interface: a *problem*.

A config names a factory, ``problem: "my_module:build"``, called with ``problem_args``.
The factory returns a :class:`Problem` or any object / mapping with these members:

- ``model``: ``torch.nn.Module`` at the checkpoint weights w*.
- ``train``, ``query``: map-style ``torch.utils.data.Dataset``; sample ids are indices.
- ``loss(model, batch)``: losses of a batch made by torch's default collate (tuples of
  tensors become lists of stacked tensors), in one of three forms:

  - per-sample losses, a Tensor of shape ``(B,)``;
  - per-token losses, a Tensor of shape ``(B, T)`` (every position valid);
  - a pair ``(losses (B, T), mask (B, T) bool)``: masked-out positions (False, e.g. padding)
    are never counted, stored or attributed.

  With token losses the SGLD minibatch loss is the mean over the batch's valid tokens, L_n
  is the mean over all valid train tokens (the LM convention) and the default nβ is the
  number of valid train tokens; the sequence-level BIF (``bif.zarr``) uses the sum of a
  sequence's valid token losses. A token's *position* is its index along T.

Optional members:

- ``fit(dataset, seed) -> nn.Module``: train a fresh model on a subset (used by ``bif lds``).
- ``loss_bounds``: ``(low, high)`` bounds every per-sample loss must satisfy
  (default ``(0, inf)`` for negative log-likelihoods). Used by the quality gates.
- ``render(split, index)``: a 2-D array (an image) or a string for reports.
- ``render_tokens(split, index) -> list[str]``: token runs only; one display string per loss
  position t of sample ``index`` (the text of the token whose loss sits at t, i.e. the
  predicted token), length T. Fills the token texts of ``tokens.parquet`` and
  ``topk_tokens.parquet``, whose contexts join them without separator: give each token the
  space before it (``bif.lm.token_texts`` does, for any Hugging Face tokenizer).

Checkpoints (:func:`load_checkpoint`): a torch state dict (``torch.load(weights_only=True)``)
or a ``.safetensors`` file; tied weights (e.g. GPT-2's ``lm_head.weight`` = ``wte.weight``)
may be stored once.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from bif.errors import CheckpointError, ProblemError

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class Problem:
    """A model at its checkpoint, its train and query sets, and a per-sample loss."""

    model: torch.nn.Module
    train: Dataset
    query: Dataset
    loss: LossFn
    fit: Callable[[Dataset, int], torch.nn.Module] | None = None
    loss_bounds: tuple[float, float] = (0.0, math.inf)
    render: Callable[[str, int], Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    render_tokens: Callable[[str, int], list[str]] | None = None


_REQUIRED = ("model", "train", "query", "loss")
_OPTIONAL = ("fit", "loss_bounds", "render", "render_tokens")


def as_problem(obj: Any) -> Problem:
    """Coerce a Problem, a mapping, or an object with the right attributes into a Problem."""
    if isinstance(obj, Problem):
        prob = obj
    else:
        get = (lambda k, d=None: obj.get(k, d)) if isinstance(obj, Mapping) else (lambda k, d=None: getattr(obj, k, d))
        missing = [k for k in _REQUIRED if get(k) is None]
        if missing:
            raise ProblemError(
                f"problem factory returned {type(obj).__name__} without {missing}; it must provide "
                "model, train, query and loss (as attributes or mapping keys)"
            )
        kwargs = {k: get(k) for k in _REQUIRED}
        kwargs.update({k: get(k) for k in _OPTIONAL if get(k) is not None})
        prob = Problem(**kwargs)
    if not isinstance(prob.model, torch.nn.Module):
        raise ProblemError(f"problem.model must be a torch.nn.Module, got {type(prob.model).__name__}")
    for split in ("train", "query"):
        ds = getattr(prob, split)
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise ProblemError(f"problem.{split} must be a map-style Dataset with __len__ and __getitem__")
        if len(ds) == 0:
            raise ProblemError(f"problem.{split} is empty")
    if not callable(prob.loss):
        raise ProblemError("problem.loss must be callable as loss(model, batch) -> Tensor of shape (B,) or (B, T), "
                           "or a pair (losses (B, T), mask (B, T) bool)")
    if prob.render_tokens is not None and not callable(prob.render_tokens):
        raise ProblemError("problem.render_tokens must be callable as render_tokens(split, index) -> list[str]")
    return prob


def _shadowing_folder(module_name: str) -> str:
    """A hint for a folder of the working directory without ``__init__.py`` that was imported as a package on the
    way to ``module_name`` (e.g. a project's ``bif/`` of configs: Dask workers have the working directory on
    ``sys.path``, and there it hides the installed package's ``bif.examples``); else ''."""
    cwd = os.getcwd()
    parts = module_name.split(".")
    for i in range(1, len(parts)):
        mod = sys.modules.get(".".join(parts[:i]))
        path = getattr(mod, "__path__", None)
        if mod is None or getattr(mod, "__file__", None) is not None or path is None:
            continue  # a regular package (or none): not a folder taken for one
        here = [p for p in path if os.path.abspath(p).startswith(os.path.join(cwd, ""))]
        if here:
            return (f". {'.'.join(parts[:i])!r} was imported from the folder {here[0]!r}, which has no __init__.py "
                    "and hides the installed package of that name: rename or move that folder, or run from another "
                    "directory")
    return ""


def import_factory(spec: str) -> Callable[..., Any]:
    """Import ``module:function``; errors name the missing part."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ProblemError(
            f"cannot import problem module {module_name!r} ({err}); check `problem:` in the config and that the "
            "module is in the working directory, installed, or on PYTHONPATH" + _shadowing_folder(module_name)
        ) from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing
        raise ProblemError(
            f"importing problem module {module_name!r} raised {type(err).__name__}: {_first_line(err)}; "
            "fix the module (run `python -c 'import " + module_name + "'` to see the traceback)"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ProblemError(f"module {module_name!r} has no attribute {attr!r} (from problem: {spec!r})") from None


def load_problem(spec: str, args: Mapping[str, Any] | None = None, *, checkpoint: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> Problem:
    """Build the problem from its factory and optionally load a checkpoint into its model."""
    factory = import_factory(spec)
    try:
        obj = factory(**dict(args or {}))
    except TypeError as err:
        raise ProblemError(f"problem factory {spec!r} rejected problem_args {dict(args or {})}: {err}") from None
    except ProblemError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the user's code is a problem error
        raise ProblemError(
            f"problem factory {spec!r} raised {type(err).__name__}: {_first_line(err)} "
            f"(called with problem_args {dict(args or {})}); fix the factory or its problem_args"
        ) from None
    prob = as_problem(obj)
    if checkpoint is not None:
        load_checkpoint(prob.model, checkpoint, storage_options=storage_options)
    return prob


def read_bytes(uri: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Read a whole file from a local path or fsspec URI."""
    from bif.store.fs import read_uri

    try:
        return read_uri(uri, storage_options)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {uri!r} does not exist") from None


def load_checkpoint(model: torch.nn.Module, uri: str, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """Load a state dict into ``model``; return the file's sha256.

    ``*.safetensors`` files are read with ``safetensors.torch.load``; anything else with
    ``torch.load(weights_only=True)``. Keys that the file leaves out because they are tied to
    a stored parameter (the same tensor in the model, e.g. GPT-2's ``lm_head.weight``) are
    not missing: they are filled through the tie. Any other missing or unexpected key is a
    CheckpointError naming it.
    """
    data = read_bytes(uri, storage_options)
    if uri.rsplit("?", 1)[0].lower().endswith(".safetensors"):
        state = _safetensors_state(uri, data)
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for corrupt / unsafe files
            raise CheckpointError(
                f"checkpoint {uri!r} could not be loaded as a state dict with weights_only=True: "
                f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            ) from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {uri!r} holds {type(state).__name__}, expected a state dict")
    state = dict(state)
    for alias, source in _tied_aliases(model).items():  # fill a tied key the file stores once
        if alias not in state and source in state:
            state[alias] = state[source]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {uri!r} does not match the model: {str(err)[:300]}") from None
    return hashlib.sha256(data).hexdigest()


def _safetensors_state(uri: str, data: bytes) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load
    except ImportError:
        raise CheckpointError(f"checkpoint {uri!r} is a .safetensors file but the safetensors package is not "
                              "installed; pip install safetensors (it comes with transformers)") from None
    try:
        return load(data)
    except Exception as err:  # noqa: BLE001 - a corrupt header or truncated file
        raise CheckpointError(f"checkpoint {uri!r} could not be read as safetensors: {type(err).__name__}: "
                              f"{_first_line(err)}") from None


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{state-dict key: first key of the same tensor} for every parameter / buffer shared under several names."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    # either name of a tied pair may be the stored one: map both ways
    out.update({v: k for k, v in list(out.items()) if v not in out})
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def tensors_hash(obj: Any, h: "hashlib._Hash | None" = None) -> "hashlib._Hash":
    """sha256 over every tensor / array / scalar nested in ``obj`` (a collated batch), in order.

    Dtype and shape are hashed too, so a cast or a reshape changes the hash.
    """
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            tensors_hash(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"seq{len(obj)}".encode())
        for v in obj:
            tensors_hash(v, h)
    elif hasattr(obj, "tobytes"):  # numpy
        h.update(f"{getattr(obj, 'dtype', '')}{getattr(obj, 'shape', '')}".encode())
        h.update(obj.tobytes())
    else:
        h.update(repr(obj).encode())
    return h


def model_hash(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters and buffers (identifies w*)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
