"""Small programs the scenarios run as subprocesses: a peak-RSS wrapper and a slow player."""
