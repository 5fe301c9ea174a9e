"""Exception types shared across STSO.

Every error a user can trigger by bad input derives from :class:`STSOError`, so
programs can catch one type and print the message, which always names the
offending field, file or value and what would fix it.
"""

from __future__ import annotations


class STSOError(Exception):
    """Base class for errors caused by user input or on-disk state."""


class ConfigError(STSOError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataError(STSOError, ValueError):
    """A corpus, tokenizer or data source cannot be used as given."""


class CheckpointError(STSOError):
    """A checkpoint cannot be written or read."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is truncated, bit-flipped or not a checkpoint at all."""
