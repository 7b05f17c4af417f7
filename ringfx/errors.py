"""Exceptions raised by ringfx.

``UnsupportedError`` marks a construct that ringfx recognises but cannot run correctly on
a ring (for example an attention whose probabilities escape, on a ring of more than one
rank). Its message names the op and the user's source line, and says what to change.
Bad arguments raise the built-in ``ValueError`` / ``TypeError`` instead. ``RingfxWarning``
marks what ringfx runs but cannot prove right (the warning says what to check).
"""

from __future__ import annotations


class UnsupportedError(RuntimeError):
    """A model construct that ringfx cannot make correct on a sharded sequence."""


class RingfxWarning(UserWarning):
    """A construct ringfx runs but cannot prove right on a sharded sequence (for example
    a model that makes positions with ``torch.arange`` over the length it sees). Make it
    an error with ``warnings.simplefilter("error", ringfx.RingfxWarning)``."""
