"""The error a bundle config item raises when it is parsed: MONAI's ``ConfigParser`` wraps the library's
own exception (a ``DRDDInputError`` naming the problem) in one ``RuntimeError`` per reference it resolves,
so tests look at the first exception of the chain."""

from __future__ import annotations

import pytest


def config_error(parser, id_: str) -> BaseException:
    """Parse ``id_`` with ``parser``, which must fail, and return the exception it started from."""
    with pytest.raises(Exception) as info:
        parser.get_parsed_content(id_)
    err = info.value
    while err.__cause__ is not None:
        err = err.__cause__
    return err
