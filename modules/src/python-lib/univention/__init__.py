"""Compatibility namespace served by the Rust directory listener.

Only used when the real UCS packages are not installed: the listener's import hook sits
at the end of ``sys.meta_path``, so anything found on ``sys.path`` wins. Extending
``__path__`` keeps real ``univention.*`` packages importable next to these.
"""

__path__ = __import__("pkgutil").extend_path(__path__, __name__)
