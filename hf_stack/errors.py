"""User-facing error type shared by every pipeline stage; the CLI prints it as one `error:` line."""

import errno

# What a full disk looks like to a write: no space, a file-size limit (RLIMIT_FSIZE, some filesystems' largest
# file), a quota.
WRITE_FAILURE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class HfStackError(ValueError):
    """A problem with the user's input (arguments, checkpoint, config, disk) that they can fix.

    The message says what is wrong and what to change. The CLI prints it as `error: <message>` and exits
    with status 2; the Python API lets it propagate.
    """


def error_reason(e: BaseException) -> str:
    """`<ExceptionType>: <first line of its message>`, the form every hf_stack message quotes a library error in."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
