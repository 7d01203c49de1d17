"""The built-in module ``listener`` that handler modules import (UCS ``python/listener.py``).

The daemon keeps real uid 0 and runs with the effective uid of the ``listener`` user, so
``setuid(0)`` gives a module root rights for a moment; the daemon takes its identity back
after every module call anyway.
"""

import functools
import os
import pwd

import _udl_host

from univention.config_registry import ConfigRegistry

__all__ = ["configRegistry", "baseConfig", "setuid", "unsetuid", "run", "SetUID"]

configRegistry = ConfigRegistry()
configRegistry.load()
baseConfig = configRegistry


def setuid(uid):
    """Sets the effective uid; ``uid`` is a number or a user name."""
    if isinstance(uid, str):
        uid = pwd.getpwnam(uid).pw_uid
    os.seteuid(uid)


def unsetuid():
    """Goes back to the daemon's effective uid (the ``listener`` user)."""
    setuid(_udl_host.daemon_uid())


def run(file, argv, uid=-1, wait=True):
    """Runs ``file`` with ``argv`` (optionally as ``uid``); returns the exit code, the
    negative signal number, the pid (``wait=False``) or 100 if it could not be started."""
    if uid > -1:
        setuid(uid)
    try:
        mode = os.P_WAIT if wait else os.P_NOWAIT
        return os.spawnv(mode, file, argv)
    except Exception:
        return 100
    finally:
        setuid(os.getuid())


class SetUID(object):
    """Context manager and decorator: run with effective uid ``uid`` (default root)."""

    def __init__(self, uid=0):
        self.uid = uid
        self.changed = False

    def __enter__(self):
        if self.uid != os.geteuid():
            setuid(self.uid)
            self.changed = True
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        if self.changed:
            unsetuid()
            self.changed = False
        return False

    def __call__(self, f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            with SetUID(self.uid):
                return f(*args, **kwargs)

        return wrapper
