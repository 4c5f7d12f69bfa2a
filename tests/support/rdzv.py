"""Race-free rendezvous for tests that start several torch.distributed ranks.

Picking a "free" TCP port (bind port 0, close the socket, hand the number to
the ranks) races: between the close and rank 0's listen, anything on the
machine may take the port (another test session on a shared CI host, another
launch of this suite). A ``file://`` init method keeps the ranks' store in a
file (torch's ``FileStore``): nothing listens on a chosen port, so nothing can
collide, and each launch gets a fresh file. (gloo's own transport listens on
ports the OS assigns, which cannot race either.)
"""

from __future__ import annotations

import os
from pathlib import Path


def file_init_method(directory: str | os.PathLike[str], name: str = "rdzv") -> str:
    """``init_method`` for ``init_process_group``: a store file ``name`` in ``directory``.

    The file must not exist yet (a FileStore left by an earlier launch would
    mix two process groups): one name per launch in a directory.
    """
    path = Path(directory).resolve() / name
    if path.exists():
        raise FileExistsError(f"rendezvous file {path} exists: use one name per launch")
    return f"file://{path}"
