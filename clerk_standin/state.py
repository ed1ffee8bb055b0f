"""The stand-in's state file: users (with their password digests), sessions and clients, kept across restarts.

Off unless a path is given (``--state-file``): tests and benchmarks keep pure in-memory state. ``make run``
keeps it in ``instance/`` next to the signing key and the app's SQLite file, so the two sides of a
registration survive a restart together. Guarantees:

- ``save_state`` replaces the file atomically (a temporary file in the same folder, flushed to disk, then
  ``os.replace``): a crash mid-write leaves the previous state, never half a file. The file is created with
  mode 0600, as it holds password digests (salted PBKDF2, never a password in clear).
- ``load_state`` returns ``None`` for a file that does not exist yet (a first start) and raises
  ``StateFileError``, a one-line message naming the file and what to do, for anything it cannot use
  (unreadable, not JSON, not the shape written here). It never starts empty over a file it could not read:
  the next write would destroy the users in it, while the app's database still names them.
- Clients (the browsers signed in through the sign-in page) are kept with the SHA-256 of their ``__client``
  token, never the token. A file written before clients existed loads with none.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1


class StateFileError(ValueError):
    """The state file exists but cannot be used; the message says which file and how to start afresh."""


@dataclass
class StandinState:
    """What the state file holds: users by id, their password digests and creation order, sessions by id,
    clients by id."""

    users: dict[str, dict[str, Any]]
    password_digests: dict[str, bytes]
    user_seq: dict[str, int]
    sessions: dict[str, dict[str, Any]]
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)


def save_state(path: str | os.PathLike[str], state: StandinState) -> None:
    """Write ``state`` to ``path`` atomically (module docstring); parent folders are created."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "version": FORMAT_VERSION,
        "users": [
            {
                "user": user,
                "seq": state.user_seq[user_id],
                "password_digest": (
                    state.password_digests[user_id].hex() if user_id in state.password_digests else None
                ),
            }
            for user_id, user in state.users.items()
        ],
        "sessions": list(state.sessions.values()),
        "clients": list(state.clients.values()),
    }
    fd, temporary = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:  # mkstemp makes it 0600
            json.dump(document, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_state(path: str | os.PathLike[str]) -> StandinState | None:
    """The state saved in ``path``; None when there is no such file; ``StateFileError`` when unusable."""
    source = Path(path)
    afresh = "fix or delete it (`make reset` removes it with the app's development database)"
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise StateFileError(f"cannot read the state file {source}: {error}; {afresh}") from None
    try:
        document = json.loads(text)
        if document.get("version") != FORMAT_VERSION:
            raise ValueError(f"version is {document.get('version')!r}, not {FORMAT_VERSION}")
        state = StandinState({}, {}, {}, {})
        for entry in document["users"]:
            user = entry["user"]
            user_id = user["id"]
            if not isinstance(user_id, str) or not isinstance(user["email_addresses"], list):
                raise ValueError("a user without an id or email addresses")
            state.users[user_id] = user
            state.user_seq[user_id] = int(entry["seq"])
            if entry["password_digest"] is not None:
                state.password_digests[user_id] = bytes.fromhex(entry["password_digest"])
        for session in document["sessions"]:
            if not isinstance(session["id"], str) or not isinstance(session["user_id"], str):
                raise ValueError("a session without an id or user id")
            state.sessions[session["id"]] = session
        for client in document.get("clients", []):
            if not isinstance(client["id"], str) or not isinstance(client["token_sha256"], str):
                raise ValueError("a client without an id or token digest")
            state.clients[client["id"]] = client
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise StateFileError(
            f"the state file {source} is not a Clerk stand-in state file ({error}); {afresh}"
        ) from None
    return state
