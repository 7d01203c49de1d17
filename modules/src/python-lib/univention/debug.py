"""``univention.debug`` for listener modules, routed into the listener's log.

Messages go to the daemon's ``tracing`` log, tagged with the calling module's name.
Levels per category as in UCS's listener: LISTENER and LDAP follow the daemon's level
(``-d``, moved by SIGUSR1/SIGUSR2), every other category starts at WARN; ``set_level``
overrides a category for every module. A message above its category's level is dropped.
UCS levels map to log levels: ERROR → error, WARN → warn, PROCESS → info, INFO → debug,
ALL → trace.
"""

import functools
import sys

try:
    import _udl_host
except ImportError:  # outside the listener, e.g. a module's own unit tests
    _udl_host = None

# Levels.
ERROR = 0
WARN = 1
PROCESS = 2
INFO = 3
ALL = 4

# Categories.
MAIN = 0x00
LDAP = 0x01
USERS = 0x02
NETWORK = 0x03
SSL = 0x04
SLAPD = 0x05
SEARCH = 0x06
TRANSFILE = 0x07
LISTENER = 0x08
POLICY = 0x09
ADMIN = 0x0A
CONFIG = 0x0B
LICENSE = 0x0C
KERBEROS = 0x0D
DHCP = 0x0E
PROTOCOL = 0x0F
MODULE = 0x10
ACL = 0x11
RESOURCES = 0x12
PARSER = 0x13
LOCALE = 0x14
AUTH = 0x15

NO_FLUSH = 0x00
FLUSH = 0x01
NO_FUNCTION = 0x00
FUNCTION = 0x01

_CATEGORY_NAMES = {
    MAIN: "MAIN", LDAP: "LDAP", USERS: "USERS", NETWORK: "NETWORK", SSL: "SSL",
    SLAPD: "SLAPD", SEARCH: "SEARCH", TRANSFILE: "TRANSFILE", LISTENER: "LISTENER",
    POLICY: "POLICY", ADMIN: "ADMIN", CONFIG: "CONFIG", LICENSE: "LICENSE",
    KERBEROS: "KERBEROS", DHCP: "DHCP", PROTOCOL: "PROTOCOL", MODULE: "MODULE", ACL: "ACL",
    RESOURCES: "RESOURCES", PARSER: "PARSER", LOCALE: "LOCALE", AUTH: "AUTH",
}

# Per-category thresholds as set by modules; the daemon's own filter applies on top.
_levels = {}
# The categories the listener sets from ``-d``; the others start at UCS's default.
_DAEMON_CATEGORIES = (LISTENER, LDAP)
_DEFAULT_LEVEL = WARN
_function_tracing = False


def _log(level, text):
    if _udl_host is not None:
        _udl_host.log(level, text)
    else:
        sys.stderr.write("%s\n" % (text,))


def debug(category, level, message, utf8=True):
    """Logs ``message`` at UCS ``level`` under ``category``."""
    if level > get_level(category):
        return
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    name = _CATEGORY_NAMES.get(category, str(category))
    _log(max(ERROR, min(ALL, int(level))), "%s %s" % (name, message))


def init(logfile, force_flush=0, enable_function=0, enable_syslog=0):
    """Accepted for compatibility: the listener owns its log destination."""
    global _function_tracing
    _function_tracing = bool(enable_function)
    return None


def reopen():
    return None


def close():
    return None


def exit():
    return None


def set_level(category, level):
    _levels[category] = level


def get_level(category):
    level = _levels.get(category)
    if level is not None:
        return level
    if category in _DAEMON_CATEGORIES and _udl_host is not None:
        return _udl_host.debug_level()
    return _DEFAULT_LEVEL


def set_function(activate):
    global _function_tracing
    _function_tracing = bool(activate)


def begin(function):
    if _function_tracing:
        _log(ALL, "UNIVENTION_DEBUG_BEGIN : %s" % (function,))


def end(function):
    if _function_tracing:
        _log(ALL, "UNIVENTION_DEBUG_END   : %s" % (function,))


class function(object):
    """Logs begin and end of a block (``with function('name'):``)."""

    def __init__(self, text, utf8=True):
        self.text = text
        begin(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.end()
        return False

    def end(self):
        if self.text is not None:
            end(self.text)
            self.text = None

    __del__ = end


def trace(with_args=True, with_return=False, repr=repr):
    """Decorator logging calls of the wrapped function at level ALL."""

    def decorator(f):
        name = "%s.%s" % (f.__module__, getattr(f, "__qualname__", f.__name__))

        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            if with_args:
                shown = ", ".join([repr(a) for a in args] + ["%s=%s" % (k, repr(v)) for k, v in kwargs.items()])
                begin("%s(%s)..." % (name, shown))
            else:
                begin("%s(...)..." % (name,))
            result = f(*args, **kwargs)
            end("%s(...)%s" % (name, " = %s" % (repr(result),) if with_return else ""))
            return result

        return wrapper

    return decorator
