"""Per-module loggers of the object-oriented API.

Every record goes to the listener's own log (tagged with the module name) and, when
``/var/log/univention/listener_modules`` is writable, also to ``<name>.log`` there as on
UCS. The level comes from UCR ``listener/module/<name>/debug/level`` (0–4, default 2).
"""

import logging
import os

try:
    import _udl_host
except ImportError:  # outside the listener, e.g. a module's own unit tests
    _udl_host = None

from univention.config_registry import ConfigRegistry

__all__ = ["get_logger", "calculate_loglevel"]

LOG_DIR = "/var/log/univention/listener_modules"
_FORMAT = "%(asctime)s %(levelname)-7s %(module)s.%(funcName)s:%(lineno)d  %(message)s"
_UCR_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG, 4: logging.DEBUG}


def calculate_loglevel(name):
    ucr = ConfigRegistry().load()
    try:
        level = int(ucr.get("listener/module/%s/debug/level" % (name,), 2))
    except ValueError:
        level = 2
    return _UCR_LEVELS.get(max(0, min(4, level)), logging.INFO)


class _ListenerLogHandler(logging.Handler):
    """Hands records to the listener's log with the matching UCS level."""

    def emit(self, record):
        try:
            message = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.ERROR:
            level = 0
        elif record.levelno >= logging.WARNING:
            level = 1
        elif record.levelno >= logging.INFO:
            level = 2
        elif record.levelno >= logging.DEBUG:
            level = 3
        else:
            level = 4
        _udl_host.log(level, message)


def _file_handler(name):
    path = os.path.join(LOG_DIR, "%s.log" % (name,))
    try:
        os.makedirs(LOG_DIR, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(logging.Formatter(_FORMAT))
    return handler


def get_logger(name, path=None):
    """The logger of listener module ``name`` (configured once)."""
    logger = logging.getLogger("univention.listener.%s" % (name,))
    if getattr(logger, "_udl_configured", False):
        return logger
    logger._udl_configured = True
    logger.propagate = False
    logger.setLevel(calculate_loglevel(name))
    host_handler = _ListenerLogHandler() if _udl_host is not None else logging.StreamHandler()
    host_handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(host_handler)
    if path is None:
        file_handler = _file_handler(name)
    else:
        try:
            file_handler = logging.FileHandler(path, encoding="utf-8")
            file_handler.setFormatter(logging.Formatter(_FORMAT))
        except OSError:
            file_handler = None
    if file_handler is not None:
        logger.addHandler(file_handler)
    return logger
