"""pmdaemon: a process manager with a built-in HTTP/TLS/TCP load balancer.

The repository root is this package (`package-dir = {pmdaemon = "."}`): `actors/`, `net/`,
`config/`, `control/` and `cli.py` install as `pmdaemon.actors`, `pmdaemon.net`, ... and nothing
else lands at the top of site-packages.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pmdaemon")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
