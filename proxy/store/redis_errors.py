"""Errors of the multiplexed Redis connection (kept apart: mypyc cannot compile
subclasses of built-in exceptions such as ``ConnectionError``)."""

from __future__ import annotations


class RedisReplyError(Exception):
    """Redis answered a command with an error reply."""


class RedisConnectionError(ConnectionError):
    """The connection failed before the reply arrived; the command may or may not have run."""
