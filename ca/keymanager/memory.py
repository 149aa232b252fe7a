"""The ``memory`` key manager: keys in a dict, gone when the process ends.

For tests, demos and ``tessera up``; a restarted server makes new authorities::

    manager = MemoryKeyManager()
    signer = manager.generate_key("jwt-a", KeyType.EC_P256)

It takes no configuration.
"""

from __future__ import annotations

import threading
from pathlib import Path

from attestor.plugin import Plugin
from attestor.settings import NoSettings
from ca.keymanager import LocalSigner
from sdk.errors import NotFound
from sdk.keys import KeyType, generate_private_key


class MemoryKeyManager:
    name = "memory"

    def __init__(self) -> None:
        self._keys: dict[str, LocalSigner] = {}
        self._lock = threading.Lock()

    def generate_key(self, key_id: str, key_type: KeyType) -> LocalSigner:
        signer = LocalSigner(key_id, generate_private_key(key_type))
        with self._lock:
            self._keys[key_id] = signer
        return signer

    def get_key(self, key_id: str) -> LocalSigner:
        with self._lock:
            signer = self._keys.get(key_id)
        if signer is None:
            raise NotFound(f"key manager 'memory' has no key with id {key_id!r}")
        return signer

    def delete_key(self, key_id: str) -> None:
        with self._lock:
            self._keys.pop(key_id, None)


def _build(settings: NoSettings, data_dir: Path) -> MemoryKeyManager:
    return MemoryKeyManager()


PLUGIN = Plugin("memory", NoSettings, _build)
