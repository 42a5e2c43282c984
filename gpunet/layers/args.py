"""Type checks of a layer's constructor arguments, read from its annotations.

Without them a wrong type surfaces far from its cause and in Python's words:
``Dense("64", 5)`` raised ``TypeError: '<' not supported between 'str' and 'int'``, and
``Dense(3, 4, bias="no")`` built a layer with a bias. Every layer's ``__init__`` is wrapped
(:func:`checked_init`, from ``Layer.__init_subclass__``) so that its arguments are checked
against its annotations; the error names the layer, the argument, what was expected and
what was got::

    Dense("64", 5)   # TypeError: Dense: expected in_features to be an int, got str '64'

A constructor's own message, which starts with the layer's name and says more (``Upscale2D:
expected scale to be an int >= 1, got 1.5``), is kept: the annotations are checked when the
constructor raises anything else, and after it returns (for a wrong type it took silently);
a helper's ValueError or TypeError that passes them gets the layer's name in front
(``Dense: unknown initialiser 'he'; expected one of [...]``).

The annotations are strings (``from __future__ import annotations``) of ``int``, ``float``
(an int is fine, as in PyTorch), ``bool``, ``str``, ``None``, ``Layer`` and ``Sequence[...]``
of those, joined by ``|``; an annotation with anything else (``Any``) is not checked here:
the constructor checks it itself.
"""
from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Callable, Mapping

import numpy as np


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_float(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _is_layer(v: Any) -> bool:
    from .base import Layer  # base imports this module
    return isinstance(v, Layer)


#: annotation name -> (test, what the message calls it)
_SIMPLE: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an int"),
    "float": (_is_float, "a number"),
    "bool": (lambda v: isinstance(v, (bool, np.bool_)), "a bool"),
    "str": (lambda v: isinstance(v, str), "a str"),
    "None": (lambda v: v is None, "None"),
    "Layer": (_is_layer, "a Layer"),
}


def _parse(annotation: str) -> list[tuple[Callable[[Any], bool], str]] | None:
    """The alternatives of ``annotation`` as (test, description), or None when it names
    anything this module does not check."""
    options = []
    for part in (p.strip() for p in annotation.split("|")):
        if part in _SIMPLE:
            options.append(_SIMPLE[part])
        elif part.startswith("Sequence[") and part.endswith("]") and part[9:-1] in _SIMPLE:
            test, what = _SIMPLE[part[9:-1]]
            options.append((lambda v, test=test: isinstance(v, (list, tuple))
                            and all(test(i) for i in v), f"a list of {what.split()[-1]}s"))
        else:
            return None
    return options


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_arguments(layer: str, annotations: Mapping[str, Any], arguments: Mapping[str, Any]
                    ) -> None:
    """Raise ``TypeError("<layer>: expected <name> to be <type>, got <type> <value>")`` for
    the first argument whose value fits none of its annotation's alternatives."""
    for name, value in arguments.items():
        annotation = annotations.get(name)
        options = _parse(annotation) if isinstance(annotation, str) else None
        if options is None or any(test(value) for test, _ in options):
            continue
        wanted = " or ".join(what for _, what in options)
        raise TypeError(f"{layer}: expected {name} to be {wanted}, got "
                        f"{type(value).__name__} {_short(value)}")


def checked_init(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a layer's ``__init__`` with :func:`check_arguments` on its annotations."""
    signature, annotations = inspect.signature(init), init.__annotations__

    @functools.wraps(init)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        layer = type(self).__name__
        try:
            init(self, *args, **kwargs)
        except Exception as e:
            if str(e).startswith(f"{layer}:"):
                raise  # the constructor's own message
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError:
                raise e from None  # a missing or unknown argument: Python's message says it
            check_arguments(layer, annotations, dict(list(bound.arguments.items())[1:]))
            if not isinstance(e, (TypeError, ValueError)):
                raise
            # a helper's message (``unknown initialiser '3'``): say which layer it was for,
            # keeping the exception's class (ShapeError, ...) where it takes a message alone
            try:
                named = type(e)(f"{layer}: {e}")
            except Exception:
                named = (TypeError if isinstance(e, TypeError) else ValueError)(f"{layer}: {e}")
            raise named from e
        bound = signature.bind(self, *args, **kwargs)
        check_arguments(layer, annotations, dict(list(bound.arguments.items())[1:]))
    return wrapped
