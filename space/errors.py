"""The two ways an app run ends badly, and nothing else: a mistake the user can fix, or a run that diverged.

Every user-facing check in the framework raises a subclass of :class:`UserError` whose message is one line,
``<field>: <problem> (<what is allowed>)``; :func:`space.app.run_app` prints it as ``error: ...`` on stderr
and exits with status 2. :class:`Diverged` (training hit a non-finite loss) exits with status 1.
"""

from __future__ import annotations


# The control characters a quoted value may hold, shown escaped: \r, \n, and \xNN for the others (tab stays)
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), 127) if c != 9} | {10: "\\n", 13: "\\r"}


class UserError(Exception):
    r"""A mistake the user can fix (bad config value, bad file, missing data); exit status 2.

    The message stays one printable line whatever value it quotes: line breaks and other control characters in it
    (a path typed as ``arch='a\nb'``) are shown escaped, as ``\n``, ``\r`` or ``\x00``."""

    def __init__(self, message: object = "", *args: object) -> None:
        if isinstance(message, str):
            message = message.translate(_ESCAPES)
        super().__init__(message, *args)


class Diverged(RuntimeError):
    """Training diverged (a non-finite loss); the last good checkpoint is kept; exit status 1."""
