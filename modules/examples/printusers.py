"""Logs changes to users into a text file (developer reference §5.2.3, for Python 3).

The file is ``/root/UserList.txt`` as in the reference, or UCR
``listener/module/printusers/file``; it is written as root (``listener.setuid(0)``).
"""

import errno
import os
from collections import namedtuple

import listener
import univention.debug as ud

name = "printusers"
description = "print all names/users/uidNumbers into a file"
filter = "".join(
    """
(&
    (|
        (&
            (objectClass=posixAccount)
            (objectClass=shadowAccount)
        )
        (objectClass=univentionMail)
        (objectClass=sambaSamAccount)
        (objectClass=simpleSecurityObject)
        (objectClass=inetOrgPerson)
    )
    (!(objectClass=univentionHost))
    (!(uidNumber=0))
    (!(uid=*$))
)""".split()
)
attributes = ["uid", "uidNumber", "cn"]
_Rec = namedtuple("Rec", " ".join(attributes))

USER_LIST = listener.configRegistry.get("listener/module/printusers/file", "/root/UserList.txt")


def handler(dn, new, old):
    """Called for every change of a matching object."""
    if new and old:
        _handle_change(dn, new, old)
    elif new and not old:
        _handle_add(dn, new)
    elif old and not new:
        _handle_remove(dn, old)


def _handle_change(dn, new, old):
    o_rec = _rec(old)
    n_rec = _rec(new)
    ud.debug(ud.LISTENER, ud.INFO, 'Edited user "%s"' % (o_rec.uid,))
    _writeit(o_rec, "edited. Is now:")
    _writeit(n_rec, None)


def _handle_add(dn, new):
    n_rec = _rec(new)
    ud.debug(ud.LISTENER, ud.INFO, 'Added user "%s"' % (n_rec.uid,))
    _writeit(n_rec, "added")


def _handle_remove(dn, old):
    o_rec = _rec(old)
    ud.debug(ud.LISTENER, ud.INFO, 'Removed user "%s"' % (o_rec.uid,))
    _writeit(o_rec, "removed")


def _rec(data):
    """Symbolic and numeric id and name from the user's attributes (values are bytes)."""
    return _Rec(*(_text(data.get(attr, [None])[0]) for attr in attributes))


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class AsRoot(object):
    """Temporarily change the effective uid to root."""

    def __enter__(self):
        listener.setuid(0)

    def __exit__(self, exc_type, exc_value, traceback):
        listener.unsetuid()


def _writeit(rec, comment):
    """Appends name, symbolic and numeric user id and the comment to the file."""
    nuid = "*****" if rec.uid in ("root", "spam") else rec.uidNumber
    indent = "\t" if comment is None else ""
    try:
        with AsRoot():
            with open(USER_LIST, "a", encoding="utf-8") as out:
                print('%sName: "%s"' % (indent, rec.cn), file=out)
                print('%sUser: "%s"' % (indent, rec.uid), file=out)
                print('%sUID: "%s"' % (indent, nuid), file=out)
                if comment:
                    print("%s%s" % (indent, comment), file=out)
    except IOError as ex:
        ud.debug(ud.LISTENER, ud.ERROR, 'Failed to write "%s": %s' % (USER_LIST, ex))


def initialize():
    """Removes the file; called when the module is (re)initialised."""
    try:
        with AsRoot():
            os.remove(USER_LIST)
        ud.debug(ud.LISTENER, ud.INFO, 'Successfully deleted "%s"' % (USER_LIST,))
    except OSError as ex:
        if ex.errno == errno.ENOENT:
            ud.debug(ud.LISTENER, ud.INFO, 'File "%s" does not exist, will be created' % (USER_LIST,))
        else:
            ud.debug(ud.LISTENER, ud.WARN, 'Failed to delete file "%s": %s' % (USER_LIST, ex))
