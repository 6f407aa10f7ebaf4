"""Errors a user can act on: one line naming the file or field and the problem, never a traceback."""


class Mistral7BError(Exception):
    """Base of the errors the CLI prints as one line."""


class CheckpointError(Mistral7BError):
    """A checkpoint that is missing, truncated, of an unknown kind, or inconsistent with its config."""


class RequestError(Mistral7BError, ValueError):
    """Bad user input to generation: a sampling parameter out of range, a prompt too long, bad messages."""


class WorkerError(Mistral7BError, RuntimeError):
    """A tensor-parallel rank stopped or cannot be reached: the group cannot compute any more."""
