"""Moved to :mod:`sdk.privatefiles`; re-exported here for code written against the old path."""

from sdk.privatefiles import (
    CREATED_PARENT_MODE,
    PRIVATE_DIR_MODE,
    make_directories,
    os_error_sentence,
    prepare_private_dir,
    prepare_socket_dir,
    write_file_atomically,
)

__all__ = [
    "CREATED_PARENT_MODE",
    "PRIVATE_DIR_MODE",
    "make_directories",
    "os_error_sentence",
    "prepare_private_dir",
    "prepare_socket_dir",
    "write_file_atomically",
]
