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

# The Python client and worker.
from ._client import Aborted as Aborted
from ._client import Ack as Ack
from ._client import AlreadyExists as AlreadyExists
from ._client import BackendState as BackendState
from ._client import BatchResult as BatchResult
from ._client import CallCancelled as CallCancelled
from ._client import Client as Client
from ._client import ClientError as ClientError
from ._client import DataLoss as DataLoss
from ._client import DeadJobsPage as DeadJobsPage
from ._client import DeadlineExceeded as DeadlineExceeded
from ._client import FailedPrecondition as FailedPrecondition
from ._client import Internal as Internal
from ._client import InvalidArgument as InvalidArgument
from ._client import ItemResult as ItemResult
from ._client import JobInfo as JobInfo
from ._client import JobRequest as JobRequest
from ._client import JobStream as JobStream
from ._client import NotFound as NotFound
from ._client import OutOfRange as OutOfRange
from ._client import PermissionDenied as PermissionDenied
from ._client import ResourceExhausted as ResourceExhausted
from ._client import Stats as Stats
from ._client import TypeLimits as TypeLimits
from ._client import TypeStats as TypeStats
from ._client import Unauthenticated as Unauthenticated
from ._client import Unavailable as Unavailable
from ._client import Unimplemented as Unimplemented
from ._client import Unknown as Unknown
from ._worker import Worker as Worker
from ._worker import WorkerStatistics as WorkerStatistics
