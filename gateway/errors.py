"""The gateway's exception tree.

    GatewayError                 base of everything the gateway raises on purpose
    ├── ConfigError              a config file is wrong: carries file, key path and why
    ├── KeyringError             a tenant key file is missing, unreadable or too short
    ├── RejectedInput            input that does not canonicalise (never carries the raw value)
    │   ├── FrameError           a serial frame is malformed or fails its checksum
    │   └── TokenError           an app or receipt token failed verification
    ├── SourceError              a source lost its device; the supervisor retries with backoff
    │   └── DecoderUnavailable   a QR decoder's library is missing (drivers.camera.decoders)
    ├── BufferError_             the outbox cannot be opened or written
    │   ├── UnknownMigrations    the buffer was migrated by a newer version (a rollback)
    │   ├── BufferFull           full, and the policy is drop_new: the event was not stored
    │   └── WriterDied           the writer thread ended: nothing more is written (exit 1)
    ├── SyncError                one consent poll failed; retried with backoff
    │   ├── SyncAuthError        401/403: fix the token file; the registry is kept
    │   ├── SyncUnavailable      no answer in time, 5xx or 429
    │   ├── SyncProtocolError    the answer breaks contract §5
    │   └── CursorExpired        410: a full snapshot is fetched next
    └── PublishError             the broker connection or a publish failed

Library errors (sqlite3, serial, paho, bleak, cv2, httpx) are mapped to these at the
boundary, once; nothing above the boundary classifies errors by message text.  Outside the
tree, and never leaving their module: ``CredentialPathError`` (a ValueError inside config
validation, reported as a ConfigError) and the drivers' private signals (``StreamLost``,
``PortLost``) that end one connection of a source.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A config value is wrong.  ``problems`` lists (file, key path, why) for each one."""

    def __init__(self, problems: list[tuple[str, str, str]]) -> None:
        self.problems = problems
        lines = [f"{file}: {path or '<top>'}: {why}" for file, path, why in problems]
        super().__init__("\n".join(lines))


class KeyringError(GatewayError):
    """A tenant key cannot be used.  Fix the key file named in the message."""


class RejectedInput(GatewayError):
    """Input that does not canonicalise.  ``reason`` is a short, countable label.

    The message never contains the raw value: it may be a personal identifier.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class FrameError(RejectedInput):
    """A serial frame is malformed or fails its checksum."""


class TokenError(RejectedInput):
    """An app or receipt token failed verification."""


class SourceError(GatewayError):
    """A source lost its device or stream; it is retried with backoff."""


class BufferError_(GatewayError):
    """The outbox database cannot be opened or written."""


class UnknownMigrations(BufferError_):
    """The buffer database holds migrations of a newer version that this one cannot read:
    the daemon refuses to start (exit 78) and the message says what to do."""


class BufferFull(BufferError_):
    """The buffer is full and the policy is ``drop_new``: the event was not stored."""


class WriterDied(BufferError_):
    """The writer thread ended on an unexpected exception: nothing more is written."""


class SyncError(GatewayError):
    """One registry poll failed; it is retried with backoff."""


class SyncAuthError(SyncError):
    """The registry refused the credentials: fix the token file; the registry is kept."""


class SyncUnavailable(SyncError):
    """The registry did not answer in time, or answered 5xx/429."""


class SyncProtocolError(SyncError):
    """The registry's answer breaks contract §5."""


class CursorExpired(SyncError):
    """HTTP 410: the cursor is too old; fetch a full snapshot."""


class PublishError(GatewayError):
    """The broker connection or a publish failed."""
