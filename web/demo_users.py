"""Demo users for ``make demo``: one per role, with printed passwords.

:func:`ensure_demo_users` creates (or resets) ``viewer``, ``operator``,
``approver`` and ``admin`` with random passwords and returns them so the
demo can print them.  Only for the throw-away demo etcd: it overwrites the
passwords of users with those names.
"""

from __future__ import annotations

import secrets

from lpmos.auth import Auth, Role

DEMO_USERS = (("viewer", Role.VIEWER), ("operator", Role.OPERATOR),
              ("approver", Role.APPROVER), ("admin", Role.ADMIN))


def ensure_demo_users(auth: Auth, *, passwords: dict[str, str] | None = None
                      ) -> list[tuple[str, str, str]]:
    """Create or reset the demo users; ``[(user, role, password)]``.

    ``passwords`` may fix some passwords (tests); others are random
    (12 URL-safe characters)."""
    result = []
    for name, role in DEMO_USERS:
        password = (passwords or {}).get(name) or secrets.token_urlsafe(9)
        auth.put_user(name, role.label, password)
        result.append((name, role.label, password))
    return result
