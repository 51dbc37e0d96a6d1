"""eventsync: a continuously synchronised local mirror of a BookStack wiki."""

__version__ = "0.1.0"
