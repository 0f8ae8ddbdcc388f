"""The error a user's configuration can cause, shared by every module that reads configuration."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message says where it came from.

    Rendered as `<source>: <key> = <value>: <what is allowed>`.
    """

    def __init__(self, source: str, key: str, value: Any, allowed: str):
        self.source, self.key, self.value, self.allowed = source, key, value, allowed
        super().__init__(f"{source}: {key} = {value!r}: {allowed}")

    def __reduce__(self):
        # Raised inside Ray workers, it must survive pickling back to the driver.
        return type(self), (self.source, self.key, self.value, self.allowed)


class StorageFullError(ConfigError):
    """The run's storage ran out of space: a fault of the environment, reported like a
    configuration error (one line naming `resources.storage`), not as a bug."""
