"""Stackduck's trio runtime: the server, its storage drivers, the client and CLI.

Public names:

* :func:`serve` and :class:`ServerConfig` / :func:`load_config` -- run a server;
* :class:`Client` and :class:`Worker` -- the Python client (``_client``, ``_worker``).
"""

from __future__ import annotations

from ._config import ConfigError as ConfigError
from ._config import ServerConfig as ServerConfig
from ._config import load_config as load_config
from ._server import serve as serve

__version__ = "0.2.0"
