"""The one error type a person is meant to read.

Anything that goes wrong because of what the user gave us (a path, a config,
a file) raises `BinaryLMError` with a message that names the problem and the
fix. The CLI prints such errors as one line, without a traceback.
"""


class BinaryLMError(ValueError):
    """A problem with the user's input, explained in the message."""
