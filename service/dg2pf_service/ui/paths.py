"""Where the dashboard lives, and which of its paths carry no data (so need no token).

A browser sends no ``Authorization`` header when it navigates to a page, so the page shells and their
static files are public: they hold no data. Everything a page shows comes from the JSON API, which the
page's scripts call with the token from its login form; the dashboard's own data route (under
``RELAY``) is checked like the API.
"""

PREFIX = "/ui"
STATIC = f"{PREFIX}/static"
RELAY = f"{PREFIX}/api"


def is_shell(path: str) -> bool:
    """True for the dashboard's pages and static files, which the request guard lets through without the token."""
    inside = path == PREFIX or path.startswith(f"{PREFIX}/")
    return inside and not (path == RELAY or path.startswith(f"{RELAY}/"))
