"""User-facing errors.

Every error a user can cause (a bad path, a bad option, a malformed checkpoint) is raised as a
`MoeServeError` whose message is one sentence naming the input and what to do. The CLI prints
just that sentence; the HTTP server maps it to a 4xx. Anything else is a bug in moeserve.
"""


class MoeServeError(ValueError):
    """An error caused by user input, with a one-sentence message meant to be shown as is."""


class ModelLoadError(MoeServeError):
    """The checkpoint directory, its config or its tensors cannot be used."""


class InputError(MoeServeError):
    """A prompt or a sampling option cannot be served."""
