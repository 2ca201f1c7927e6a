"""The one exception type for a user's mistake: main prints its message as one line and
exits with status 2, before anything compiles."""


class UserError(Exception):
    """A bad config value, missing data, or a mesh that does not fit: the user can fix it."""
