"""Tracks renames and moves as such (developer reference §5.2.2).

With ``modrdn`` set, ``handler`` gets the command as a fourth argument: a move arrives as
``r`` (old side only) followed by ``a`` with the same entryUUID. The ``r`` is held back
until the next call decides whether it was a move or a removal. (Held in memory only: if
the listener stops in between, the move shows up as a removal and an addition.)
Output goes to UCR ``listener/module/modrdn/file``.
"""

import listener

name = "modrdn"
description = "log renames and moves of people as such"
filter = "(objectClass=inetOrgPerson)"
modrdn = "1"

LOG = listener.configRegistry.get(
    "listener/module/modrdn/file", "/var/lib/univention-directory-listener/modrdn.log"
)

_delay = None


def handler(dn, new, old, command):
    global _delay
    if _delay:
        old_dn, old_entry = _delay
        _delay = None
        if command == "a" and old_entry.get("entryUUID") == new.get("entryUUID"):
            handler_move(old_dn, old_entry, dn, new)
            return
        handler_remove(old_dn, old_entry)

    if command == "n" and dn == "cn=Subschema":
        handler_schema(old, new)
    elif new and not old:
        handler_add(dn, new)
    elif new and old:
        handler_modify(dn, old, new)
    elif old and not new:
        if command == "r":
            _delay = (dn, old)
        else:
            handler_remove(dn, old)


def handler_add(dn, new):
    _log("add", dn)


def handler_modify(dn, old, new):
    _log("modify", dn)


def handler_remove(dn, old):
    _log("remove", dn)


def handler_move(old_dn, old, new_dn, new):
    _log("move", old_dn, "->", new_dn)


def handler_schema(old, new):
    _log("schema")


def _log(*fields):
    with open(LOG, "a", encoding="utf-8") as out:
        out.write(" ".join(fields) + "\n")
