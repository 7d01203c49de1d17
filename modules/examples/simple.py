"""Basic listener module: one function per kind of change (developer reference §5.2.1).

Renames and moves arrive as a removal at the old DN followed by an addition at the new one.
Every change is appended to the file named by UCR ``listener/module/simple/file``.
"""

import listener

name = "simple"
description = "log additions, modifications and removals of people"
filter = "(objectClass=inetOrgPerson)"

LOG = listener.configRegistry.get(
    "listener/module/simple/file", "/var/lib/univention-directory-listener/simple.log"
)


def handler(dn, new, old):
    if new and not old:
        handler_add(dn, new)
    elif new and old:
        handler_modify(dn, old, new)
    elif not new and old:
        handler_remove(dn, old)
    # Neither side: nothing to do (reserved by UCS for future use).


def handler_add(dn, new):
    _log("add", dn)


def handler_modify(dn, old, new):
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    _log("modify", dn, ",".join(changed))


def handler_remove(dn, old):
    _log("remove", dn)


def _log(*fields):
    with open(LOG, "a", encoding="utf-8") as out:
        out.write(" ".join(fields) + "\n")
