"""User-facing error type shared by every pipeline stage; the CLI prints it as one `error:` line."""


class HfStackError(ValueError):
    """A problem with the user's input (arguments, checkpoint, config, disk) that they can fix.

    The message says what is wrong and what to change. The CLI prints it as `error: <message>` and exits
    with status 2; the Python API lets it propagate.
    """
