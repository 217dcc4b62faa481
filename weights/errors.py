"""Errors a user can act on when getting weights."""


class WeightsError(ValueError):
    """A checkpoint that cannot be found or read: the message names the file and the problem."""
