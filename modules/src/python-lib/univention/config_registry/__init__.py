"""``univention.config_registry`` for listener modules on hosts without UCS.

Reads the UCR layers from ``/etc/univention`` like UCS (forced > schedule > ldap > normal
> default). A listener started with another ``--ucr-file`` reads that file as the normal layer
and the other layers from its directory, exactly as the daemon itself does (both parsers are
tested against one fixture). With ``UNIVENTION_BASECONF`` set, or a ``filename`` given, only
that file is used, as in UCS. Writes (``handler_set``/``handler_unset``, ``save``) go to the
normal layer, atomically.
"""

import os
import re
import tempfile

try:
    import _udl_host
except ImportError:  # outside the listener, e.g. a module's own unit tests
    _udl_host = None

try:
    from collections.abc import MutableMapping
except ImportError:  # pragma: no cover
    from collections import MutableMapping

__all__ = [
    "ConfigRegistry",
    "ucr",
    "handler_set",
    "handler_unset",
    "ucr_live",
]

PREFIX = "/etc/univention"
_TRUE = frozenset(("yes", "true", "1", "enable", "enabled", "on"))
_FALSE = frozenset(("no", "false", "0", "disable", "disabled", "off"))
_HEADER = "# univention_ base.conf\n\n"
_VALID_KEY = re.compile(r"^[^\s:=#]+$")


class ConfigRegistry(MutableMapping):
    """UCR variables as a mapping: missing keys read as ``None`` like UCS."""

    NORMAL, LDAP, SCHEDULE, FORCED, CUSTOM, DEFAULTS = range(6)
    LAYER_PRIORITIES = (FORCED, SCHEDULE, LDAP, NORMAL, DEFAULTS)
    _FILES = {
        FORCED: "base-forced.conf",
        SCHEDULE: "base-schedule.conf",
        LDAP: "base-ldap.conf",
        NORMAL: "base.conf",
        DEFAULTS: "base-defaults.conf",
    }

    def __init__(self, filename=None, write_registry=NORMAL):
        self._layers = {}
        self._write_registry = write_registry
        custom = filename or os.environ.get("UNIVENTION_BASECONF")
        if custom:
            self._paths = {self.NORMAL: custom}
            self._order = (self.NORMAL,)
            return
        base_conf = (_udl_host and _udl_host.ucr_file()) or os.path.join(PREFIX, self._FILES[self.NORMAL])
        directory = os.path.dirname(base_conf)
        self._paths = {layer: os.path.join(directory, name) for layer, name in self._FILES.items()}
        self._paths[self.NORMAL] = base_conf
        self._order = self.LAYER_PRIORITIES

    # loading and saving

    def load(self):
        """(Re)reads every layer; a missing file is an empty layer."""
        self._layers = {layer: _read(self._paths[layer]) for layer in self._order}
        return self

    def save(self):
        path = self._paths.get(self._write_registry)
        if path is not None:
            _write(path, self._layers.get(self._write_registry, {}))

    def lock(self):
        return None

    def unlock(self):
        return None

    # mapping access

    def get(self, key, default=None, getscope=False):
        for layer in self._order:
            values = self._layers.get(layer, {})
            if key in values:
                return (layer, values[key]) if getscope else values[key]
        return default

    def __getitem__(self, key):
        return self.get(key)

    def __setitem__(self, key, value):
        self._layers.setdefault(self._write_registry, {})[key] = value

    def __delitem__(self, key):
        del self._layers.setdefault(self._write_registry, {})[key]

    def __contains__(self, key):
        return any(key in self._layers.get(layer, {}) for layer in self._order)

    def _merged(self):
        merged = {}
        for layer in reversed(self._order):
            merged.update(self._layers.get(layer, {}))
        return merged

    def __iter__(self):
        return iter(self._merged())

    def __len__(self):
        return len(self._merged())

    def items(self, getscope=False):
        return self._merged().items()

    def __repr__(self):
        return "%s(%r)" % (type(self).__name__, self._merged())

    # typed access

    def is_true(self, key=None, default=False, value=None):
        if value is None:
            value = self.get(key)
            if value is None:
                return default
        return value.lower() in _TRUE

    def is_false(self, key=None, default=False, value=None):
        if value is None:
            value = self.get(key)
            if value is None:
                return default
        return value.lower() in _FALSE

    def get_int(self, key, default=None):
        try:
            return int(self.get(key))
        except (TypeError, ValueError):
            return default

    def update(self, changes):
        """Sets (value) or unsets (``None``) variables in the write layer and saves."""
        layer = self._layers.setdefault(self._write_registry, {})
        previous = {}
        for key, value in changes.items():
            previous[key] = layer.get(key)
            if value is None:
                layer.pop(key, None)
            else:
                layer[key] = value
        self.save()
        return previous


def _read(path):
    values = {}
    try:
        # Universal newlines: "\r\n" and a lone "\r" end lines, as in UCS.
        with open(path, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                if line.lstrip().startswith("#"):
                    continue
                key, sep, value = line.partition(":")
                key = key.strip()
                if sep and key:
                    values[key] = value.rstrip("\n").lstrip(" ")
    except FileNotFoundError:
        pass
    return values


def _write(path, values):
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".base.conf.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(_HEADER)
            for key in sorted(values):
                stream.write("%s: %s\n" % (key, values[key]))
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def handler_set(args, opts={}, quiet=False):
    """``ucr set key=value …`` (``key?value`` sets only if unset)."""
    registry = ConfigRegistry().load()
    changes = {}
    for arg in args:
        if "?" in arg and ("=" not in arg or arg.index("?") < arg.index("=")):
            key, _, value = arg.partition("?")
            if registry.get(key) is not None:
                continue
        else:
            key, sep, value = arg.partition("=")
            if not sep:
                raise ValueError("invalid UCR assignment: %r" % (arg,))
        if not _VALID_KEY.match(key):
            raise ValueError("invalid UCR variable name: %r" % (key,))
        changes[key] = value
    return registry.update(changes)


def handler_unset(args, opts={}):
    """``ucr unset key …``."""
    registry = ConfigRegistry().load()
    return registry.update({key: None for key in args})


class _LazyRegistry(ConfigRegistry):
    """``univention.config_registry.ucr``: loaded on first use."""

    _loaded = False

    def _ensure(self):
        if not self._loaded:
            self._loaded = True
            ConfigRegistry.load(self)

    def get(self, key, default=None, getscope=False):
        self._ensure()
        return ConfigRegistry.get(self, key, default, getscope)

    def __contains__(self, key):
        self._ensure()
        return ConfigRegistry.__contains__(self, key)

    def _merged(self):
        self._ensure()
        return ConfigRegistry._merged(self)

    def load(self):
        self._loaded = True
        return ConfigRegistry.load(self)


ucr = _LazyRegistry()


def ucr_live():
    return ConfigRegistry().load()
