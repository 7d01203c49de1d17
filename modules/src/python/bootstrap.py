"""Runs once when the listener starts its interpreter: output into the log, and the
``univention.*`` compatibility packages as a fallback import source."""

import importlib.abc
import importlib.machinery
import importlib.util
import io
import sys

import _udl_host


class _LogStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr``: complete lines go to the listener's log."""

    def __init__(self, level, name):
        self._level = level
        self._name = name
        self._pending = ""

    @property
    def name(self):
        return self._name

    @property
    def encoding(self):
        return "utf-8"

    def writable(self):
        return True

    def isatty(self):
        return False

    def write(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self._pending += text
        if "\n" in self._pending:
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                _udl_host.log(self._level, line)
        return len(text)

    def flush(self):
        if self._pending:
            line, self._pending = self._pending, ""
            _udl_host.log(self._level, line)


class _CompatFinder(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Serves the embedded ``univention.*`` modules; it sits last in ``sys.meta_path``, so
    real packages found on ``sys.path`` win."""

    def __init__(self, sources):
        self._sources = sources

    def find_spec(self, fullname, path=None, target=None):
        entry = self._sources.get(fullname)
        if entry is None:
            return None
        is_package, _source, origin = entry
        spec = importlib.machinery.ModuleSpec(fullname, self, origin=origin, is_package=is_package)
        if is_package:
            spec.submodule_search_locations = []
        spec.has_location = False
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        _is_package, source, origin = self._sources[module.__name__]
        module.__file__ = origin
        exec(compile(source, origin, "exec"), module.__dict__)

    def get_source(self, fullname):
        entry = self._sources.get(fullname)
        return None if entry is None else entry[1]

    def is_package(self, fullname):
        entry = self._sources.get(fullname)
        return bool(entry and entry[0])


sys.meta_path.append(_CompatFinder(_udl_host.compat_sources()))
sys.stdout = _LogStream(2, "<stdout>")
sys.stderr = _LogStream(1, "<stderr>")
