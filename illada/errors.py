"""The one error a user can fix: the CLI prints its message on one line and exits 2.

Raise a subclass (ConfigError, LineageError, LaunchError, ...) or UserError itself with a
message that says what to change; `illada -v` shows the traceback as well.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for (config, paths, addresses, data), not a bug."""


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`: itself, the cause of a Ray task error, or its chain's."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            return exc
        # Ray wraps a task's exception; `as_instanceof_cause` keeps the original as `cause`.
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


# The extra that installs each optional top-level module (pyproject.toml's extras).
EXTRA_OF_MODULE = {
    "torch": "train",
    "megatron": "train",
    "safetensors": "train",
    "ray": "data",
    "datatrove": "data",
    "scipy": "data",
    "lm_eval": "eval",
}


def missing_extra(exc: BaseException) -> UserError | None:
    """An optional dependency this command needs is not installed: say which extra brings it."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    module = exc.name.split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return UserError(f"this command needs {module}, which is not installed: pip install 'illada[{extra}]'")
