"""The base of every error a user can fix from its message (a recipe, a file, a checkpoint, a push): the command line
prints it on one line and exits 2; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Input the user can fix; the message names the file or key and what is wrong."""
