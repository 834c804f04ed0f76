"""The two ways an app run ends badly, and nothing else: a mistake the user can fix, or a run that diverged.

Every user-facing check in the framework raises a subclass of :class:`UserError` whose message is one line,
``<field>: <problem> (<what is allowed>)``; :func:`space.app.run_app` prints it as ``error: ...`` on stderr
and exits with status 2. :class:`Diverged` (training hit a non-finite loss) exits with status 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad config value, bad file, missing data); exit status 2."""


class Diverged(RuntimeError):
    """Training diverged (a non-finite loss); the last good checkpoint is kept; exit status 1."""
