class TaskDataError(ValueError):
    """Bad task data or task name; the message names the file, the row and what is wrong."""
