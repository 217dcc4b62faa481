"""Errors a user can act on when getting weights."""


from tinygpt.errors import WeightsError

__all__ = ["WeightsError"]
