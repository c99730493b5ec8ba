"""The error hierarchy. The CLI turns every `UserInputError` into one line and exit code 2."""

from __future__ import annotations


class SlimllmError(Exception):
    """Root of every error slimllm raises on purpose."""


class UserInputError(SlimllmError):
    """Bad input from the user: a wrong path, an unsupported model, an impossible setting.

    The message names the offending value and how to fix it.
    """


class MissingDependencyError(SlimllmError):
    """An optional dependency is not installed; the message names the extra to install."""


class ExportError(SlimllmError):
    """Lowering a model to ONNX or GGUF failed."""


class ValidationError(SlimllmError):
    """A parity or quality check failed. `mismatches` lists every failed figure, not just the first."""

    def __init__(self, message: str, mismatches: list[str] | None = None) -> None:
        self.mismatches = list(mismatches or [])
        detail = "; ".join(self.mismatches)
        super().__init__(f"{message}: {detail}" if detail else message)


class OutOfDiskSpaceError(SlimllmError):
    """Writing an artifact failed because the disk is full."""


# Exit codes used by the CLI.
EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


def parse_choice(enum_type, value, option: str):
    """`enum_type(value)`, or a user error naming the option and every accepted value."""
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(str(member.value) for member in enum_type)
        raise UserInputError(f"unknown {option} {value!r}; use one of {choices}") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a one-line error quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
